"""Model families and their presets. A family is a file; `registry` maps names to (Config,
Model) and presets to configs, so a recipe can say `model: gpt2-small`; `record` writes and reads
the model record every checkpoint carries; `protocols` says what a model can do."""

from tformer.models.protocols import (CausalLM, Classifier, ConditionalDecoder, ImageClassifier, ImageSampler,
                                      MemoryLM, TextClassifier, can, capabilities)
from tformer.models.record import config_from_record, model_from_record, model_record, record_of
from tformer.models.registry import FAMILIES, PRESETS, build_model, family_of, get_config

__all__ = ["FAMILIES", "PRESETS", "CausalLM", "Classifier", "ConditionalDecoder", "ImageClassifier",
           "ImageSampler", "MemoryLM", "TextClassifier", "build_model", "can", "capabilities",
           "config_from_record", "family_of", "get_config", "model_from_record", "model_record", "record_of"]

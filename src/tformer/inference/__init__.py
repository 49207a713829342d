"""Using trained models: incremental decoding, sampling, streaming, beam search."""

from tformer.inference.beam import Hypothesis, beam_search
from tformer.inference.generate import GREEDY, Sampling, generate, pad_prompts, stream

__all__ = ["GREEDY", "Hypothesis", "Sampling", "beam_search", "generate", "pad_prompts", "stream"]

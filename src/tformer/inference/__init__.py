"""Using trained models: incremental decoding, sampling, beam search."""

from tformer.inference.generate import GREEDY, Sampling, generate, pad_prompts, stream

__all__ = ["GREEDY", "Sampling", "generate", "pad_prompts", "stream"]

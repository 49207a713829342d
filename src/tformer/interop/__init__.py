"""Reading and writing other libraries' checkpoints (Hugging Face GPT-2)."""

from tformer.interop.huggingface import gpt_config_to_hf, load_gpt2, load_gpt2_config, save_gpt2

__all__ = ["gpt_config_to_hf", "load_gpt2", "load_gpt2_config", "save_gpt2"]

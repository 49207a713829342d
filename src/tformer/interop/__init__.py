"""Reading and writing other libraries' checkpoints: Hugging Face GPT-2 (in and out) and BERT
(in, including MiniLM-style encoders)."""

from tformer.interop.hf_bert import convert_bert, load_bert, load_bert_config, load_bert_tokenizer
from tformer.interop.huggingface import gpt_config_to_hf, load_gpt2, load_gpt2_config, save_gpt2

__all__ = ["convert_bert", "gpt_config_to_hf", "load_bert", "load_bert_config", "load_bert_tokenizer",
           "load_gpt2", "load_gpt2_config", "save_gpt2"]

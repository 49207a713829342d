"""Other tools' formats, in and out.

    huggingface / hf_bert / hf_vit / hf_llama   Hugging Face checkpoints: GPT-2, BERT, ViT, Llama
    hf_export      a run as its Hugging Face twin (picked from the model's config)
    peft           LoRA adapters in peft's format
    onnx_export    ONNX graphs of any run (prefill/decode with the K/V cache as inputs and outputs)
    onnx_decode    serve an exported folder with onnxruntime and numpy alone

Names are imported on first use (PEP 562), so `tformer.interop.onnx_decode` loads on a machine
without PyTorch: importing this package imports nothing.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "convert_bert": "hf_bert", "load_bert": "hf_bert", "load_bert_config": "hf_bert",
    "load_bert_tokenizer": "hf_bert", "save_bert": "hf_bert",
    "load_vit": "hf_vit", "convert_vit": "hf_vit", "save_vit": "hf_vit",
    "gpt_config_to_hf": "huggingface", "load_gpt2": "huggingface", "load_gpt2_config": "huggingface",
    "save_gpt2": "huggingface", "convert_gpt2": "huggingface",
    "load_llama": "hf_llama", "save_llama": "hf_llama", "convert_llama": "hf_llama",
    "export_hf": "hf_export", "export_run": "hf_export",
    "export_onnx": "onnx_export", "OnnxModel": "onnx_decode",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'tformer.interop' has no attribute {name!r}")
    return getattr(importlib.import_module(f"tformer.interop.{_WHERE[name]}"), name)

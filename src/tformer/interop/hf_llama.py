"""Hugging Face Llama checkpoints (LlamaForCausalLM) <-> tformer's GPT built from Llama's parts:
rotary positions, RMSNorm, SwiGLU, grouped-query attention (the `llama-mini` preset's shape).

A checkpoint directory holds config.json + model.safetensors (or a sharded index); pickles are
never loaded. Both sides use RoPE in the rotate-half layout (dimension i pairs with i + head_dim/2,
`tformer.nn.position`; HF's `rotate_half`), with the same frequencies base^(-2i/head_dim), so q and
k rows are copied unpermuted: the permutation in Meta's conversion script maps Meta's interleaved
pairs to this layout and is already in every HF checkpoint. HF's separate q/k/v and gate/up
Linears become our fused `qkv_proj` ([q | k | v] rows) and `gate_up` ([gate | up]). GQA repeats
each key/value head for consecutive query heads on both sides (`repeat_interleave`, `repeat_kv`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from tformer.config import ConfigError
from tformer.files import read_json
from tformer.interop.huggingface import (CONFIG_FILE, check_counts, check_empty_output, dtype_name, gather_tensors,
                                         load_checkpoint_tokenizer, read_safetensors, refuse_edits,
                                         shared_gpt_problems, split_rows, write_checkpoint, write_run)
from tformer.models.gpt import GPT, GPTConfig

log = logging.getLogger(__name__)

LAYER_PARTS = {"attn.qkv_proj": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
               "attn.out_proj": ["self_attn.o_proj"], "ffn.gate_up": ["mlp.gate_proj", "mlp.up_proj"],
               "ffn.down": ["mlp.down_proj"]}
NORMS = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)  # a buffer old checkpoints saved


def llama_problems(config: GPTConfig) -> list[str]:
    """What HF Llama cannot express in `config`, one phrase each (empty: it can)."""
    problems = []
    if config.position != "rope":
        problems.append(f"position={config.position!r} (Llama has rotary positions)")
    if config.norm != "rmsnorm":
        problems.append(f"norm={config.norm!r} (Llama has RMSNorm)")
    if config.activation != "swiglu":
        problems.append(f"activation={config.activation!r} (Llama's MLP is SwiGLU)")
    return problems + shared_gpt_problems(config)


def gpt_config_to_llama(config: GPTConfig, *, bos_token_id: int | None = None,
                        eos_token_id: int | None = None) -> dict[str, Any]:
    """The config.json dict of HF LlamaForCausalLM for `config`; ConfigError if Llama cannot hold it."""
    problems = llama_problems(config)
    if problems:
        raise ConfigError(f"cannot export {'; '.join(problems)} to HF Llama")
    rope = {"rope_type": "default", "rope_theta": config.rope_base}
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": config.vocab_size,
            "hidden_size": config.d_model, "intermediate_size": config.ffn_dim,
            "num_hidden_layers": config.n_layers, "num_attention_heads": config.n_heads,
            "num_key_value_heads": config.n_kv_heads or config.n_heads, "head_dim": config.head_dim,
            "hidden_act": "silu", "max_position_embeddings": config.context_length,
            "rms_norm_eps": config.norm_eps, "initializer_range": config.init_std,
            "tie_word_embeddings": config.tie_embeddings, "attention_bias": config.bias,
            "mlp_bias": config.bias, "attention_dropout": config.dropout, "pretraining_tp": 1,
            "rope_parameters": rope, "rope_theta": config.rope_base, "rope_scaling": None,  # 5.x and 4.x keys
            "use_cache": True, "bos_token_id": bos_token_id, "eos_token_id": eos_token_id,
            "pad_token_id": None}


def _rope_base(hf: dict, where: str) -> float:
    """rope_theta of a default (unscaled) RoPE; scaled variants are refused in one line."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default" and rope.get("factor") not in (None, 1, 1.0):
        kind = f"factor {rope['factor']} without a rope_type"
    if kind != "default":
        raise ConfigError(f"RoPE scaling {kind!r} in {where} is not supported: tformer's rotary "
                          "embedding has plain frequencies base^(-2i/d) only (rope_type 'default')")
    if float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))) != 1.0:
        raise ConfigError(f"partial_rotary_factor in {where} is not supported: tformer rotates every "
                          "dimension of a head")
    return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


def hf_config_to_gpt(hf: dict, where: str) -> GPTConfig:
    """Our GPTConfig (rope, rmsnorm, swiglu) for an HF Llama config.json dict."""
    if hf.get("model_type") != "llama":
        raise ConfigError(f"model_type={hf.get('model_type')!r} in {where}: only 'llama' checkpoints "
                          "(LlamaForCausalLM) can be loaded as a Llama-style tformer GPT")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act={hf['hidden_act']!r} in {where} is not supported: tformer's SwiGLU "
                          "gates with silu")
    check_counts(hf, ("vocab_size", "max_position_embeddings", "num_hidden_layers", "num_attention_heads",
                      "num_key_value_heads", "hidden_size", "intermediate_size", "head_dim"), where)
    bias = bool(hf.get("attention_bias", False))
    if bool(hf.get("mlp_bias", False)) != bias:
        raise ConfigError(f"attention_bias={bias} and mlp_bias={hf.get('mlp_bias')} in {where}: tformer's GPT "
                          "has one bias setting for every projection; both must be equal")
    d_model, n_heads = hf.get("hidden_size", 4096), hf.get("num_attention_heads", 32)
    if hf.get("head_dim") not in (None, d_model // n_heads):
        raise ConfigError(f"head_dim={hf['head_dim']} in {where} is not supported (only hidden_size / "
                          f"num_attention_heads = {d_model // n_heads})")
    n_kv = hf.get("num_key_value_heads") or n_heads
    d_ff = hf.get("intermediate_size", 11008)
    config = GPTConfig(
        vocab_size=hf.get("vocab_size", 32000), context_length=hf.get("max_position_embeddings", 2048),
        n_layers=hf.get("num_hidden_layers", 32), n_heads=n_heads, n_kv_heads=None if n_kv == n_heads else n_kv,
        d_model=d_model, d_ff=d_ff, dropout=float(hf.get("attention_dropout", 0.0)), bias=bias,
        norm="rmsnorm", norm_eps=float(hf.get("rms_norm_eps", 1e-6)), activation="swiglu", position="rope",
        rope_base=_rope_base(hf, where), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)))
    default = dataclasses.replace(config, d_ff=None)
    return default if default.ffn_dim == d_ff else config  # d_ff None when it is the preset rule's


def load_llama_config(path: str | os.PathLike) -> GPTConfig:
    """The GPTConfig of the HF Llama checkpoint directory `path` (its config.json)."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: is {path} a Hugging Face checkpoint directory?")
    return hf_config_to_gpt(read_json(file, "Hugging Face config"), str(file))


def tensor_names(config: GPTConfig) -> dict[str, list[str]]:
    """Our state-dict name -> the HF names concatenated into it (rows)."""
    names = {"tok_emb.weight": ["model.embed_tokens.weight"], "norm.weight": ["model.norm.weight"]}
    kinds = ("weight", "bias") if config.bias else ("weight",)
    for i in range(config.n_layers):
        for ours, theirs in LAYER_PARTS.items():
            for kind in kinds:
                names[f"blocks.{i}.{ours}.{kind}"] = [f"model.layers.{i}.{t}.{kind}" for t in theirs]
        for ours, theirs in NORMS.items():
            names[f"blocks.{i}.{ours}.weight"] = [f"model.layers.{i}.{theirs}.weight"]
    if not config.tie_embeddings:
        names["lm_head.weight"] = ["lm_head.weight"]
    return names


def row_sizes(config: GPTConfig) -> dict[str, list[int]]:
    """Rows of each fused tensor per HF tensor: q, k, v differ under grouped-query attention."""
    q, kv, ff = config.d_model, (config.n_kv_heads or config.n_heads) * config.head_dim, config.ffn_dim
    sizes = {}
    for i in range(config.n_layers):
        for kind in ("weight", "bias"):
            sizes[f"blocks.{i}.attn.qkv_proj.{kind}"] = [q, kv, kv]
            sizes[f"blocks.{i}.ffn.gate_up.{kind}"] = [ff, ff]
    return sizes


def load_llama(path: str | os.PathLike, *, dtype: torch.dtype | None = None,
               device: torch.device | str | None = None) -> GPT:
    """A GPT (eval mode) with the weights of the HF Llama checkpoint directory `path`. Missing,
    extra and misshapen tensors raise one ValueError naming them."""
    root = Path(path)
    config = load_llama_config(root)
    tensors, stored = read_safetensors(root, lambda name: name, "LlamaForCausalLM")
    names = tensor_names(config)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in GPT(config).state_dict().items()}
    state, problems = gather_tensors(names, tensors, shapes)
    used = {n for theirs in names.values() for n in theirs}
    extra = [n for n in tensors if n not in used and not n.endswith(IGNORED_SUFFIXES)
             and not (n == "lm_head.weight" and config.tie_embeddings)]
    problems += [f"unexpected tensor {stored[n]!r}" for n in extra[:5]]
    if problems:
        raise ValueError(f"checkpoint {root} does not match its config ({config.n_layers} layers): "
                         + "; ".join(problems))
    if config.tie_embeddings:
        state["lm_head.weight"] = state["tok_emb.weight"]
    with torch.device(device or "cpu"):
        model = GPT(config)
    model.to(dtype or state["tok_emb.weight"].dtype).load_state_dict(state)  # strict
    log.info("loaded Llama checkpoint %s (%d layers, d_model=%d, %d key/value heads)", root, config.n_layers,
             config.d_model, config.n_kv_heads or config.n_heads)
    return model.eval()


def save_llama(model: GPT, path: str | os.PathLike, *, bos_token_id: int | None = None,
               eos_token_id: int | None = None, documents: Mapping[str, Any] | None = None) -> Path:
    """Write `model` (rope, rmsnorm, swiglu) as a new HF LlamaForCausalLM checkpoint folder at
    `path` (config.json + model.safetensors + `documents`), whole or not at all."""
    if not isinstance(model, GPT):
        raise TypeError(f"save_llama exports a tformer GPT, got {type(model).__name__}")
    refuse_edits(model, "HF Llama")
    hf_config = gpt_config_to_llama(model.config, bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    state = model.state_dict()
    hf_config["dtype"] = dtype_name(state["tok_emb.weight"])
    tensors = split_rows(tensor_names(model.config), state, row_sizes(model.config))
    write_checkpoint(path, hf_config, tensors, documents)
    log.info("saved Llama checkpoint to %s", path)
    return Path(path)


def convert_llama(path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write the HF Llama checkpoint `path` (with its tokenizer.json) as a new tformer run directory."""
    check_empty_output(Path(out_dir))
    load_llama_config(path)  # a folder that is no Llama checkpoint is named before its tokenizer
    tokenizer = load_checkpoint_tokenizer(path)
    return write_run(out_dir, load_llama(path), path, tokenizer)


__all__ = ["convert_llama", "gpt_config_to_llama", "hf_config_to_gpt", "llama_problems", "load_llama",
           "load_llama_config", "save_llama"]

"""Hugging Face ViT checkpoints (ViTForImageClassification; ViTModel given new labels) <->
`tformer.models.vit.ViT` (export: ViTForImageClassification + its image processor's config).

A checkpoint directory holds config.json + model.safetensors (or a sharded index); pickles are
never loaded. HF's separate query/key/value Linears become our fused `qkv_proj` (rows
[q | k | v]). Loading is strict: every tensor is used or named as extra, every parameter is set.
`convert_vit` writes a tformer run directory that `tformer.runs.open_run` reads and recipes fine-tune from.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tformer.config import ConfigError
from tformer.files import read_json
from tformer.interop.huggingface import (CONFIG_FILE, check_counts, check_empty_output, dtype_name, gather_tensors,
                                         read_safetensors, refuse_edits, split_rows, write_checkpoint, write_run)
from tformer.models.vit import ViT, ViTConfig

log = logging.getLogger(__name__)

ARCHITECTURES = ("ViTForImageClassification", "ViTModel")
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                  "relu": "relu", "silu": "silu", "swish": "silu"}
TO_HF_ACTIVATION = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu", "silu": "silu"}
PREPROCESSOR_FILE = "preprocessor_config.json"
LAYER_PARTS = {"attn_norm": "layernorm_before", "attn.out_proj": "attention.output.dense",
               "ffn_norm": "layernorm_after", "ffn.up": "intermediate.dense", "ffn.down": "output.dense"}
POOLER = ("pooler.dense.weight", "pooler.dense.bias")  # ViTModel's tanh pooler; classification skips it


def _pair(value: int | Sequence[int], key: str, where: str) -> int:
    """One side of a square size; HF also allows [height, width]."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ConfigError(f"{key}={list(value)} in {where}: tformer's ViT takes square images and "
                              "patches only")
        value = value[0]
    return int(value)


def _labels(hf: dict) -> tuple[str, ...]:
    id2label = hf.get("id2label") or {str(i): f"LABEL_{i}" for i in range(hf.get("num_labels", 2))}
    return tuple(str(id2label[k]) for k in sorted(id2label, key=int))


def hf_config_to_vit(hf: dict, where: str, *, labels: Sequence[str] | None = None) -> ViTConfig:
    """Our ViTConfig for an HF ViT config.json dict; labels None: from its id2label."""
    if hf.get("model_type") != "vit":
        raise ConfigError(f"model_type={hf.get('model_type')!r} in {where}: only 'vit' checkpoints "
                          "(ViTForImageClassification, ViTModel) can be loaded as a tformer ViT")
    arch = (hf.get("architectures") or ["ViTModel"])[0]
    if arch not in ARCHITECTURES:
        raise ConfigError(f"architecture {arch!r} in {where} is not supported; only {list(ARCHITECTURES)}")
    act = hf.get("hidden_act", "gelu")
    if act not in HF_ACTIVATIONS:
        raise ConfigError(f"hidden_act={act!r} in {where} is not supported; choose one of "
                          f"{sorted(HF_ACTIVATIONS)}")
    check_counts(hf, ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size",
                      "num_channels", "num_labels", "head_dim"), where)
    d_model, n_heads = hf.get("hidden_size", 768), hf.get("num_attention_heads", 12)
    if hf.get("head_dim") not in (None, d_model // n_heads):
        raise ConfigError(f"head_dim={hf['head_dim']} in {where} is not supported (only hidden_size / "
                          f"num_attention_heads = {d_model // n_heads})")
    labels = _labels(hf) if labels is None else tuple(labels)
    dropout = float(hf.get("hidden_dropout_prob", 0.0))
    attn_dropout = float(hf.get("attention_probs_dropout_prob", 0.0))  # None below: "as dropout"
    return ViTConfig(
        image_size=_pair(hf.get("image_size", 224), "image_size", where),
        patch_size=_pair(hf.get("patch_size", 16), "patch_size", where),
        channels=hf.get("num_channels", 3), n_classes=len(labels), labels=labels, d_model=d_model,
        n_layers=hf.get("num_hidden_layers", 12), n_heads=n_heads, d_ff=hf.get("intermediate_size", 3072),
        dropout=dropout, attn_dropout=None if attn_dropout == dropout else attn_dropout, pooling="cls",
        position="learned", norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
        activation=HF_ACTIVATIONS[act], qkv_bias=bool(hf.get("qkv_bias", True)),
        init_std=float(hf.get("initializer_range", 0.02)))


def load_vit_config(path: str | os.PathLike, *, labels: Sequence[str] | None = None) -> ViTConfig:
    """The ViTConfig of the HF checkpoint directory `path` (its config.json); `labels` replace
    the classes of its id2label."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: is {path} a Hugging Face checkpoint directory?")
    return hf_config_to_vit(read_json(file, "Hugging Face config"), str(file), labels=labels)


def tensor_names(config: ViTConfig, *, classifier: bool = True) -> dict[str, list[str]]:
    """Our state-dict name -> the HF names (without the "vit." prefix) concatenated into it."""
    names = {"cls_token": ["embeddings.cls_token"], "pos_emb": ["embeddings.position_embeddings"]}
    for kind in ("weight", "bias"):
        names[f"patch_emb.proj.{kind}"] = [f"embeddings.patch_embeddings.projection.{kind}"]
        names[f"norm.{kind}"] = [f"layernorm.{kind}"]
        if classifier:
            names[f"head.{kind}"] = [f"classifier.{kind}"]
        for i in range(config.n_layers):
            hf = f"encoder.layer.{i}."
            if kind == "weight" or config.qkv_bias:
                names[f"blocks.{i}.attn.qkv_proj.{kind}"] = [f"{hf}attention.attention.{p}.{kind}"
                                                            for p in ("query", "key", "value")]
            for ours, theirs in LAYER_PARTS.items():
                names[f"blocks.{i}.{ours}.{kind}"] = [f"{hf}{theirs}.{kind}"]
    return names


def load_vit(path: str | os.PathLike, *, labels: Sequence[str] | None = None,
             dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> ViT:
    """A ViT (eval mode) with the weights of the HF ViT checkpoint directory `path`.

    labels None: the checkpoint's classifier and id2label are used; a checkpoint without one
    (ViTModel) is refused. labels given: a fresh classifier for these classes (fine-tuning); any
    classifier in the checkpoint is dropped, logged. Missing or extra tensors and wrong shapes
    raise one ValueError that names them.
    """
    root = Path(path)
    config = load_vit_config(root, labels=labels)
    fresh_head = labels is not None
    tensors, stored = read_safetensors(root, lambda name: name.removeprefix("vit."),
                                       "ViTForImageClassification")
    if not fresh_head and "classifier.weight" not in tensors:
        raise ValueError(f"{root} has no classifier (a ViTModel checkpoint?); pass labels=[...] to "
                         "load its encoder under a freshly initialised classification head")
    names = tensor_names(config, classifier=not fresh_head)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in ViT(config).state_dict().items()}
    state, problems = gather_tensors(names, tensors, shapes)
    used = {n for theirs in names.values() for n in theirs}
    skipped = [n for n in tensors if n.startswith("classifier.")] if fresh_head else []
    extra = [n for n in tensors if n not in used and n not in POOLER and n not in skipped]
    problems += [f"unexpected tensor {stored[n]!r}" for n in extra]
    if problems:
        raise ValueError(f"checkpoint {root} does not match a {config.n_layers}-layer ViT: "
                         + "; ".join(problems))
    if skipped:
        log.info("%s: the checkpoint's classifier is replaced by a fresh one for %d labels", root, len(labels))
    if any(n in tensors for n in POOLER):
        log.info("%s: ViTModel's pooler (dense + tanh) is not part of a ViT classifier; left out", root)
    with torch.device(device or "cpu"):
        model = ViT(config)
    if fresh_head:
        state.update({k: v for k, v in model.state_dict().items() if k.startswith("head.")})
    model.load_state_dict(state)  # strict: every parameter comes from the checkpoint or a fresh head
    model.to(dtype or state["pos_emb"].dtype)
    log.info("loaded ViT checkpoint %s (%d layers, d_model=%d, %d classes)", root, config.n_layers,
             config.d_model, config.n_classes)
    return model.eval()


def convert_vit(path: str | os.PathLike, out_dir: str | os.PathLike, *,
                labels: Sequence[str] | None = None) -> Path:
    """Write the HF checkpoint `path` as a new tformer run directory (checkpoints/best, no tokenizer),
    which `tformer.runs.open_run` reads and recipes fine-tune from (`model.init_from: out_dir`)."""
    check_empty_output(Path(out_dir))
    return write_run(out_dir, load_vit(path, labels=labels), path)


def vit_problems(config: ViTConfig) -> list[str]:
    """What HF ViTForImageClassification cannot express in `config`, one phrase each."""
    problems = []
    if config.pooling != "cls":
        problems.append(f"pooling={config.pooling!r} (ViTForImageClassification classifies the [CLS] state)")
    if config.position != "learned":
        problems.append(f"position={config.position!r} (HF ViT has learned positions)")
    if config.norm != "layernorm":
        problems.append(f"norm={config.norm!r} (HF ViT has LayerNorm)")
    return problems


def vit_config_to_hf(config: ViTConfig, labels: Sequence[str]) -> dict[str, Any]:
    """The config.json dict of HF ViTForImageClassification; ConfigError if it cannot hold `config`."""
    problems = vit_problems(config)
    if problems:
        raise ConfigError(f"cannot export {'; '.join(problems)} to HF ViT")
    return {"model_type": "vit", "architectures": ["ViTForImageClassification"],
            "hidden_size": config.d_model, "num_hidden_layers": config.n_layers,
            "num_attention_heads": config.n_heads, "intermediate_size": config.ffn_dim,
            "hidden_act": TO_HF_ACTIVATION[config.activation], "hidden_dropout_prob": config.dropout,
            "attention_probs_dropout_prob": config.attention_dropout, "initializer_range": config.init_std,
            "layer_norm_eps": config.norm_eps, "image_size": config.image_size, "patch_size": config.patch_size,
            "num_channels": config.channels, "qkv_bias": config.qkv_bias,
            "id2label": {str(i): label for i, label in enumerate(labels)},
            "label2id": {label: i for i, label in enumerate(labels)}}


def image_processor_config(config: ViTConfig) -> dict[str, Any]:
    """preprocessor_config.json of a ViTImageProcessor feeding the model what `models.vit.normalise`
    does: pixels / 255, then (x - 0.5) / 0.5 per channel, at the model's image size."""
    return {"image_processor_type": "ViTImageProcessor", "do_resize": True,
            "size": {"height": config.image_size, "width": config.image_size}, "resample": 2,
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": [0.5] * config.channels, "image_std": [0.5] * config.channels}


def save_vit(model: ViT, path: str | os.PathLike) -> Path:
    """Write `model` as a new HF ViTForImageClassification checkpoint folder at `path`
    (config.json with id2label/label2id, model.safetensors, preprocessor_config.json), whole or
    not at all."""
    if not isinstance(model, ViT):
        raise TypeError(f"save_vit exports a tformer ViT, got {type(model).__name__}")
    refuse_edits(model, "HF ViT")
    hf_config = vit_config_to_hf(model.config, model.labels)
    state = model.state_dict()
    hf_config["dtype"] = hf_config["torch_dtype"] = dtype_name(state["pos_emb"])
    full = {ours: [n if n.startswith("classifier.") else "vit." + n for n in theirs]
            for ours, theirs in tensor_names(model.config).items()}
    write_checkpoint(path, hf_config, split_rows(full, state),
                     {PREPROCESSOR_FILE: image_processor_config(model.config)})
    log.info("saved ViT checkpoint to %s", path)
    return Path(path)

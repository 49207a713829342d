"""LoRA adapters in peft's format (`adapter_config.json` + `adapter_model.safetensors`), for the
families that have a transformers twin: GPT -> GPT2LMHeadModel, Bert -> BertModel /
BertForSequenceClassification / BertForTokenClassification. peft itself is not needed.

Module names follow transformers' (the mappings of `interop.huggingface` and `interop.hf_bert`):
GPT-2's `c_attn`, `c_proj`, `c_fc` are Conv1D (weight (in, out): `fan_in_fan_out: true`) but
peft keeps their adapters as (r, in) / (out, r), like ours. BERT's query/key/value are separate
Linears where ours is one fused `qkv_proj` (rows [q | k | v]): the fused adapter B A is written as
three adapters sharing A, each with its rows of B, which is exact; reading fuses them back when
their A is the same. A task head trained beside the adapters goes to `modules_to_save` when
transformers has the same head ([CLS] pooler + classifier); a mean-pooling head has none, so only
the encoder's adapters are written (logged).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from tformer.files import atomic_directory, check_output_folder, read_json
from tformer.interop import hf_bert, huggingface
from tformer.models.bert import Bert
from tformer.models.edits import edit_kinds, edit_params, note_edit
from tformer.models.gpt import GPT
from tformer.nn import lora
from tformer.nn.quantized import QuantizedLinear

log = logging.getLogger(__name__)

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."  # peft's prefix of the wrapped model's names
UNSUPPORTED = {"use_rslora": False, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {}}


def twin(model: nn.Module) -> tuple[str, str, bool, dict[str, list[str]], dict[str, str]]:
    """The transformers class of `model`, the prefix of its encoder/decoder names, fan_in_fan_out,
    our linear -> its linears (rows split equally), and our head module -> its module (those that
    match a transformers head). A family without a twin is one ValueError."""
    if isinstance(model, GPT):
        huggingface.gpt_config_to_hf(model.config)  # ConfigError when GPT-2 cannot express it
        linears = {ours.rsplit(".", 1)[0]: ["transformer." + hf.rsplit(".", 1)[0]]
                   for hf, (ours, conv1d) in huggingface.tensor_names(model.config).items()
                   if conv1d and hf.endswith(".weight")}
        return "GPT2LMHeadModel", "transformer.", True, linears, {}
    if isinstance(model, Bert):
        config = model.config
        with_head = config.head == "token" or (config.head == "sequence" and config.pooling == "cls")
        cls = {"sequence": "BertForSequenceClassification", "token": "BertForTokenClassification"}.get(
            config.head, "BertModel") if with_head else "BertModel"
        prefix = "bert." if with_head else ""
        modules = dict(model.named_modules())
        linears = {ours.rsplit(".", 1)[0]: [prefix + hf.rsplit(".", 1)[0] for hf in theirs]
                   for ours, theirs in hf_bert.tensor_names(config).items() if ours.endswith(".weight")
                   and isinstance(modules.get(ours.rsplit(".", 1)[0]), (nn.Linear, lora.LoRALinear))}
        heads = {}
        if with_head:
            for ours, theirs in hf_bert.head_tensor_names(config).items():
                if ours.endswith(".weight"):
                    hf = theirs[0].rsplit(".", 1)[0]
                    heads[ours.rsplit(".", 1)[0]] = hf if hf.startswith(("classifier", "cls.")) else prefix + hf
        elif config.head != "none":
            log.warning("transformers has no %s head with %s pooling: only the encoder's adapters are written "
                        "in peft's format (for %s)", config.head, config.pooling, cls)
        return cls, prefix, False, linears, heads
    raise ValueError(f"a {type(model).__name__} has no transformers twin; peft's format is written for GPT "
                     "(GPT-2) and Bert runs; save the adapters in tformer's format instead (without --peft)")


def check_plain_base(model: nn.Module, doing: str) -> None:
    """peft's adapters sit on transformers' model, which has one head count and width for every
    layer and float weights: a pruned or quantized base is one ValueError line."""
    edits = sorted(edit_kinds(model) - {"lora"})
    if any(isinstance(m, QuantizedLinear) for m in model.modules()) and "quantize" not in edits:
        edits.append("quantize")
    if edits:
        raise ValueError(f"cannot {doing} peft's format for a model edited by {', '.join(edits)}: transformers' "
                         "twin has the same heads and width in every layer and float weights; use tformer's "
                         "adapter format instead (without --peft)")


def check_new_folder(out: str | Path) -> Path:
    """`out` when it is a new or empty folder; else one ValueError line, nothing in it touched
    (files.check_output_folder would accept a folder holding an earlier adapter_config.json, and
    atomic_directory would then replace everything else in it)."""
    out = Path(out).expanduser()
    check_output_folder(out, CONFIG_FILE, "tformer's peft writer")  # a file: one line
    if out.is_dir() and any(out.iterdir()):
        raise ValueError(f"--out {out} is not empty; give a new or empty folder (nothing in it was changed)")
    return out


def write_peft(model: nn.Module, out: str | Path, *, base_model: str | None = None) -> Path:
    """Write the LoRA adapters of `model` (and its task head, when transformers has it) in
    peft's format at the new or empty folder `out`."""
    layers = lora.lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters to write; train it from a recipe with model.lora")
    check_plain_base(model, "write")
    out = check_new_folder(out)
    cls, _, fan_in_fan_out, linears, heads = twin(model)
    params = edit_params(model, "lora") or {"r": next(iter(layers.values())).r,
                                            "alpha": next(iter(layers.values())).alpha, "dropout": 0.0}
    tensors: dict[str, Tensor] = {}
    targets: list[str] = []
    for name, layer in layers.items():
        if name not in linears:
            raise ValueError(f"the adapted layer {name} has no counterpart in transformers' {cls}; "
                             "peft's format cannot hold it")
        theirs = linears[name]
        for hf, rows in zip(theirs, layer.lora_B.detach().chunk(len(theirs), dim=0)):  # (out / k, r) each
            tensors[f"{PREFIX}{hf}.lora_A.weight"] = layer.lora_A.detach().clone()  # own storage each:
            tensors[f"{PREFIX}{hf}.lora_B.weight"] = rows.clone()  # safetensors refuses shared memory
            targets.append(hf)
    state = model.state_dict()
    for ours, hf in heads.items():
        for kind in ("weight", "bias"):
            if f"{ours}.{kind}" in state:
                tensors[f"{PREFIX}{hf}.{kind}"] = state[f"{ours}.{kind}"].clone()
    config = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model,
              "auto_mapping": {"base_model_class": cls, "parent_library": "transformers"},
              "r": params["r"], "lora_alpha": params["alpha"], "lora_dropout": params.get("dropout", 0.0),
              "target_modules": targets, "fan_in_fan_out": fan_in_fan_out, "bias": "none",
              "modules_to_save": sorted(set(heads.values())) or None, "inference_mode": True,
              "init_lora_weights": True, **UNSUPPORTED, "layers_to_transform": None, "layers_pattern": None}
    with atomic_directory(out) as staging:
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    log.info("wrote %d LoRA adapters for transformers' %s in peft's format to %s", len(targets), cls, out)
    return out


def check_shapes(model: nn.Module, adapters: dict[str, tuple[Tensor, Tensor]], r: int, folder: Path) -> None:
    """Every adapter fits its layer: A (r, in), B (out, r); else one ValueError line naming the first
    that does not (adapters for another size of the model, or a base pruned since)."""
    modules = dict(model.named_modules())
    for name, (a, b) in adapters.items():
        layer = modules.get(name)
        if type(layer) is not nn.Linear:
            raise ValueError(f"{folder}: the adapters are for {name}, which is not a plain linear layer of this "
                             f"{type(model).__name__}")
        want_a, want_b = (r, layer.in_features), (layer.out_features, r)
        if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            raise ValueError(f"{folder}: the adapter of {name} is A {tuple(a.shape)}, B {tuple(b.shape)}; this "
                             f"{type(model).__name__}'s layer needs A {want_a}, B {want_b} (r={r}); give the base "
                             "model the adapters were trained on")


def read_peft(folder: str | Path, model: nn.Module) -> nn.Module:
    """Put the peft adapters in `folder` on `model` (a plain GPT or Bert with the base weights,
    its head as the adapters expect), in place; returns it with the lora edit noted."""
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise FileNotFoundError(f"{folder} does not exist; give a folder with peft adapters ({CONFIG_FILE} + "
                                f"{WEIGHTS_FILE})")
    if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise ValueError(f"{folder} holds no peft adapters ({CONFIG_FILE} + {WEIGHTS_FILE})")
    check_plain_base(model, "read")
    if lora.lora_layers(model):
        raise ValueError(f"the model already has LoRA adapters; read the adapters in {folder} onto its base run")
    config = read_json(folder / CONFIG_FILE, "peft adapter config")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{folder / CONFIG_FILE}: peft_type {config.get('peft_type')!r}; only LORA adapters are read")
    for key, plain in UNSUPPORTED.items():
        if config.get(key) not in (plain, None):
            raise ValueError(f"{folder / CONFIG_FILE}: {key}={config[key]!r} is not supported (only {plain!r})")
    tensors = {k.removeprefix(PREFIX): v for k, v in load_file(str(folder / WEIGHTS_FILE)).items()}
    _, _, _, linears, heads = twin(model)
    adapters: dict[str, tuple[Tensor, Tensor]] = {}
    for ours, theirs in linears.items():
        found = [(tensors.get(f"{hf}.lora_A.weight"), tensors.get(f"{hf}.lora_B.weight")) for hf in theirs]
        if all(a is None for a, _ in found):
            continue
        if any(a is None or b is None for a, b in found):
            raise ValueError(f"{folder}: {ours} is split into {theirs} in transformers, and some of them have no "
                             "adapter; tformer's fused layer needs all or none")
        if any(not torch.equal(a, found[0][0]) for a, _ in found):
            raise ValueError(f"{folder}: the adapters of {', '.join(theirs)} have different A matrices; tformer's "
                             f"fused {ours.rsplit('.', 1)[-1]} needs them shared")
        adapters[ours] = (found[0][0], torch.cat([b for _, b in found]))
    if not adapters:
        raise ValueError(f"{folder} has no adapters for a {type(model).__name__}'s layers (transformers' names "
                         f"such as {next(iter(linears.values()))[0]})")
    r = int(config["r"])
    alpha, dropout = config.get("lora_alpha", 8), config.get("lora_dropout", 0.0)
    check_shapes(model, adapters, r, folder)
    modules = list(adapters)
    lora.wrap(model, modules, r, alpha, dropout)
    layers = lora.lora_layers(model)
    with torch.no_grad():
        for name, (a, b) in adapters.items():
            layers[name].lora_A.copy_(a)
            layers[name].lora_B.copy_(b)
        state = dict(model.named_parameters())
        for ours, hf in heads.items():
            for kind in ("weight", "bias"):
                if f"{hf}.{kind}" in tensors:
                    state[f"{ours}.{kind}"].copy_(tensors[f"{hf}.{kind}"])
    note_edit(model, "lora", {"targets": None, "r": r, "alpha": alpha, "dropout": dropout, "modules": modules})
    log.info("read %d LoRA adapters from %s", len(modules), folder)
    return model


__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "read_peft", "twin", "write_peft"]

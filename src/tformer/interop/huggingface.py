"""Hugging Face GPT-2 checkpoints <-> `tformer.models.gpt.GPT`: read and write a directory of
config.json + model.safetensors (or a sharded index) in HF's layout. Pickles are never loaded.

HF GPT-2 stores its projections as `Conv1D` with weight (in, out); ours are `nn.Linear` with
weight (out, in), so those matrices are transposed both ways. Transformers itself is not needed.
A GPT without biases is written with zero biases, and a checkpoint whose biases are all zero
loads without them. Also the pieces every family's import and export share: reading safetensors
(`read_safetensors`, `gather_tensors`), writing a new checkpoint folder whole (`write_checkpoint`,
`split_rows`, `refuse_edits`) and an imported run directory (`write_run`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from tformer.config import ConfigError
from tformer.files import atomic_directory, read_json
from tformer.models.edits import edit_kinds
from tformer.models.gpt import GPT, GPTConfig
from tformer.models.record import model_record
from tformer.runs import checkpoint
from tformer.runs.run import HAS_TOKENIZER, TOKENIZER_FILE, check_vocabulary
from tformer.tokenizers import HFJsonTokenizer, load_hf_tokenizer

log = logging.getLogger(__name__)

CONFIG_FILE, WEIGHTS_FILE, INDEX_FILE = "config.json", "model.safetensors", "model.safetensors.index.json"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")

# HF activation_function -> ours; both tanh forms are the same function (Hendrycks & Gimpel 2016)
HF_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu",
                  "relu": "relu", "silu": "silu", "swish": "silu"}
TO_HF_ACTIVATION = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}
# GPT2Config defaults, for keys a config.json leaves out
HF_DEFAULTS = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, n_inner=None,
                   activation_function="gelu_new", resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1,
                   layer_norm_epsilon=1e-5, initializer_range=0.02, tie_word_embeddings=True)
# options HF GPT-2 has and GPT does not: key -> the only value we can honour
UNSUPPORTED = {"scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
               "scale_attn_weights": True, "add_cross_attention": False}
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of old checkpoints


def _hf_config_to_gpt(hf: dict, where: str) -> GPTConfig:
    if hf.get("model_type") != "gpt2":
        raise ConfigError(f"model_type={hf.get('model_type')!r} in {where}: only 'gpt2' checkpoints "
                          "can be loaded")
    for key, allowed in UNSUPPORTED.items():
        if hf.get(key, allowed) != allowed:
            raise ConfigError(f"{key}={hf[key]!r} in {where} is not supported by tformer's GPT "
                              f"(only {allowed!r})")
    check_counts(hf, ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner"), where)
    c = {**HF_DEFAULTS, **{k: v for k, v in hf.items() if k in HF_DEFAULTS}}
    if c["activation_function"] not in HF_ACTIVATIONS:
        raise ConfigError(f"activation_function={c['activation_function']!r} in {where} is not "
                          f"supported; choose one of {sorted(HF_ACTIVATIONS)}")
    if len({c["resid_pdrop"], c["embd_pdrop"], c["attn_pdrop"]}) > 1:
        log.info("%s: GPT has one dropout rate; using resid_pdrop=%s for all", where, c["resid_pdrop"])
    return GPTConfig(vocab_size=c["vocab_size"], context_length=c["n_positions"], n_layers=c["n_layer"],
                     n_heads=c["n_head"], d_model=c["n_embd"], d_ff=c["n_inner"],
                     dropout=float(c["resid_pdrop"]), norm_eps=c["layer_norm_epsilon"],
                     activation=HF_ACTIVATIONS[c["activation_function"]], position="learned",
                     tie_embeddings=bool(c["tie_word_embeddings"]), init_std=c["initializer_range"])


def load_gpt2_config(path: str | os.PathLike) -> GPTConfig:
    """The GPTConfig of the HF GPT-2 checkpoint directory `path` (its config.json)."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: is {path} a Hugging Face checkpoint directory?")
    return _hf_config_to_gpt(read_json(file, "Hugging Face config"), str(file))


def tensor_names(config: GPTConfig) -> dict[str, tuple[str, bool]]:
    """HF tensor name (without the 'transformer.' prefix) -> (our state-dict name, transpose)."""
    names = {"wte.weight": ("tok_emb.weight", False), "wpe.weight": ("pos_emb.embedding.weight", False),
             "ln_f.weight": ("norm.weight", False), "ln_f.bias": ("norm.bias", False)}
    parts = {"ln_1": ("attn_norm", False), "attn.c_attn": ("attn.qkv_proj", True),
             "attn.c_proj": ("attn.out_proj", True), "ln_2": ("ffn_norm", False),
             "mlp.c_fc": ("ffn.up", True), "mlp.c_proj": ("ffn.down", True)}
    for i in range(config.n_layers):
        for hf_part, (ours, conv1d) in parts.items():
            names[f"h.{i}.{hf_part}.weight"] = (f"blocks.{i}.{ours}.weight", conv1d)
            names[f"h.{i}.{hf_part}.bias"] = (f"blocks.{i}.{ours}.bias", False)
    if not config.tie_embeddings:
        names["lm_head.weight"] = ("lm_head.weight", False)
    return names


def weight_files(root: Path) -> dict[str, Path]:
    """Tensor name as stored -> the safetensors file that holds it."""
    if (root / WEIGHTS_FILE).is_file():
        with safe_open(root / WEIGHTS_FILE, framework="pt") as f:
            return {name: root / WEIGHTS_FILE for name in f.keys()}
    if (root / INDEX_FILE).is_file():
        weight_map = json.loads((root / INDEX_FILE).read_text())["weight_map"]
        for shard in sorted(set(weight_map.values())):
            if not (root / shard).is_file():
                raise FileNotFoundError(f"shard {shard} listed in {root / INDEX_FILE} is missing")
        return {name: root / file for name, file in weight_map.items()}
    if any((root / name).is_file() for name in PICKLE_FILES):
        raise ValueError(
            f"{root} holds only pickled weights (pytorch_model.bin); tformer refuses pickles because "
            "loading one can run arbitrary code. Convert it once, in an environment you trust: "
            "`transformers.GPT2LMHeadModel.from_pretrained(path).save_pretrained(path, "
            "safe_serialization=True)` writes model.safetensors")
    raise FileNotFoundError(f"no {WEIGHTS_FILE} or {INDEX_FILE} in {root}")


def _check_tensors(root: Path, config: GPTConfig, files: dict[str, Path]) -> None:
    """One ValueError listing every tensor that is missing or has a shape `config` contradicts."""
    stored = {name.removeprefix("transformer."): name for name in files}
    with torch.device("meta"):  # shapes only, no memory
        shapes = {name: tuple(t.shape) for name, t in GPT(config).state_dict().items()}
    problems = []
    for hf_name, (ours, transpose) in tensor_names(config).items():
        if hf_name not in stored:
            searched = sorted({str(file) for file in files.values()})
            problems.append(f"missing tensor {hf_name!r} (searched {searched})")
            continue
        want = shapes[ours][::-1] if transpose else shapes[ours]
        file = files[stored[hf_name]]
        with safe_open(file, framework="pt") as f:
            got = tuple(f.get_slice(stored[hf_name]).get_shape())
        if got != want:
            problems.append(f"tensor {stored[hf_name]!r} in {file} has shape {got}, "
                            f"config.json implies {want}")
    if problems:
        raise ValueError(f"checkpoint {root} does not match its config: " + "; ".join(problems))


def load_gpt2(path: str | os.PathLike, *, dtype: torch.dtype | None = None,
              device: torch.device | str | None = None) -> GPT:
    """A GPT (eval mode) with the weights of the HF GPT-2 checkpoint directory `path`.

    dtype: None keeps the checkpoint's floating dtype. Missing tensors and wrong shapes raise
    one ValueError naming the tensor and file; `attn.bias` mask buffers are ignored.
    """
    root = Path(path)
    config = load_gpt2_config(root)
    files = weight_files(root)
    stored = {name.removeprefix("transformer."): name for name in files}
    expected = tensor_names(config)
    _check_tensors(root, config, files)
    extra = [n for n in stored if n not in expected and not n.endswith(IGNORED_SUFFIXES)
             and not (n == "lm_head.weight" and config.tie_embeddings)]
    if extra:
        log.warning("%s: ignoring %d tensors GPT-2 does not use, e.g. %s", root, len(extra), extra[:3])
    state: dict[str, Tensor] = {}
    for file in sorted(set(files.values())):
        with safe_open(file, framework="pt") as f:
            for hf_name, (ours, transpose) in expected.items():
                if files[stored[hf_name]] == file:
                    tensor = f.get_tensor(stored[hf_name])
                    state[ours] = tensor.t() if transpose else tensor
    if config.tie_embeddings:
        state["lm_head.weight"] = state["tok_emb.weight"]
    biases = [name for name in state if name.endswith(".bias")]
    if all(not state[name].any() for name in biases):  # a bias=False model exported by save_gpt2
        log.info("%s: every bias is zero; loading it as a model without biases (the same function)", root)
        config = dataclasses.replace(config, bias=False)
        state = {name: tensor for name, tensor in state.items() if name not in biases}
    dtype = dtype or state["tok_emb.weight"].dtype
    with torch.device(device or "cpu"):
        model = GPT(config)
    model.to(dtype).load_state_dict(state)  # copies, casting to the model's dtype
    log.info("loaded GPT-2 checkpoint %s (%d layers, d_model=%d)", root, config.n_layers, config.d_model)
    return model.eval()


def gpt2_problems(config: GPTConfig) -> list[str]:
    """What HF GPT-2 cannot express in `config`, one phrase each (empty: it can). Missing biases
    are not a problem: they are written as zeros, the same function."""
    problems = []
    if config.position != "learned":
        problems.append(f"position={config.position!r} (GPT-2 has learned positions)")
    if config.norm != "layernorm":
        problems.append(f"norm={config.norm!r} (GPT-2 has LayerNorm)")
    if config.activation not in TO_HF_ACTIVATION:
        problems.append(f"activation={config.activation!r} (GPT-2's MLP takes {sorted(TO_HF_ACTIVATION)})")
    if config.n_kv_heads not in (None, config.n_heads):
        problems.append(f"n_kv_heads={config.n_kv_heads} (grouped-query attention; GPT-2 has one key/value "
                        "head per query head)")
    problems += shared_gpt_problems(config)
    return problems


def shared_gpt_problems(config: GPTConfig) -> list[str]:
    """What neither HF GPT-2 nor HF Llama can express."""
    problems = []
    if config.qk_norm:
        problems.append("qk_norm=True (neither normalises queries and keys)")
    if config.attn_pattern != "causal":
        problems.append(f"attn_pattern={config.attn_pattern!r} (every query attends to all earlier tokens "
                        "there; train with attn_pattern=causal)")
    return problems


def gpt_config_to_hf(config: GPTConfig, *, bos_token_id: int | None = None,
                     eos_token_id: int | None = None) -> dict:
    """The config.json dict of HF GPT-2 for `config`; ConfigError if GPT-2 cannot express it."""
    problems = gpt2_problems(config)
    if problems:
        raise ConfigError(f"cannot export {'; '.join(problems)} to HF GPT-2")
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
            "vocab_size": config.vocab_size, "n_positions": config.context_length,
            "n_embd": config.d_model, "n_layer": config.n_layers, "n_head": config.n_heads,
            "n_inner": config.d_ff, "activation_function": TO_HF_ACTIVATION[config.activation],
            "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.dropout,
            "layer_norm_epsilon": config.norm_eps, "initializer_range": config.init_std,
            **{key: allowed for key, allowed in UNSUPPORTED.items()},
            "tie_word_embeddings": config.tie_embeddings, "use_cache": True,
            "bos_token_id": bos_token_id, "eos_token_id": eos_token_id}


def refuse_edits(model: nn.Module, target: str) -> None:
    """One ConfigError when `model` was pruned, quantized or given adapters: an HF config has the
    same heads and width in every layer and float weights."""
    edits = sorted(edit_kinds(model))
    if edits:
        raise ConfigError(f"cannot export a model edited by {', '.join(edits)} to {target}, which has the same "
                          "heads and width in every layer and float weights; export the run it came from "
                          "(a LoRA run: merge it first with `tformer adapter RUN --merge --out DIR`)")


def dtype_name(tensor: Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def check_export_folder(out: Path) -> None:
    """An export writes a new folder: a file, or a folder holding anything, is refused untouched."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; give a new folder to export into")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held:
        shown = ", ".join(held[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
        raise ValueError(f"{out} already holds files ({shown}); export into a new or empty folder "
                         "(nothing in it was changed)")


def write_checkpoint(path: str | os.PathLike, hf_config: dict, tensors: dict[str, Tensor],
                     documents: Mapping[str, Any] | None = None) -> Path:
    """A new HF checkpoint folder: config.json, model.safetensors and `documents` (file name ->
    JSON data: tokenizer.json, preprocessor_config.json). Everything is written into a hidden
    sibling folder and renamed into place at the end, so a failure leaves no folder behind."""
    root = Path(path)
    check_export_folder(root)
    with atomic_directory(root) as staging:
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        for name, data in {CONFIG_FILE: hf_config, **(documents or {})}.items():
            (staging / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return root


def split_rows(names: dict[str, list[str]], state: Mapping[str, Tensor],
               sizes: Mapping[str, list[int]] | None = None) -> dict[str, Tensor]:
    """HF tensors from ours, the inverse of `gather_tensors`: a tensor that HF keeps as several
    (q | k | v, gate | up) is split by rows, equally unless `sizes` names the row counts."""
    tensors = {}
    for ours, theirs in names.items():
        tensor = state[ours].detach().to("cpu")
        parts = (tensor.split(list(sizes[ours])) if sizes and ours in sizes
                 else tensor.chunk(len(theirs)) if len(theirs) > 1 else [tensor])
        for name, part in zip(theirs, parts):
            tensors[name] = part.contiguous().clone()  # safetensors refuses views of one storage
    return tensors


def save_gpt2(model: GPT, path: str | os.PathLike, *, bos_token_id: int | None = None,
              eos_token_id: int | None = None, documents: Mapping[str, Any] | None = None) -> Path:
    """Write `model` as a new HF GPT-2 checkpoint folder (config.json + model.safetensors, and
    `documents` such as tokenizer.json) at `path`: a new or empty folder, written whole or not at
    all. A model without biases gets zero biases (the same function). The token ids go to
    config.json (GPTConfig does not know them)."""
    if not isinstance(model, GPT):
        raise TypeError(f"save_gpt2 exports a tformer GPT, got {type(model).__name__}")
    refuse_edits(model, "HF GPT-2")
    check_export_folder(Path(path))
    hf_config = gpt_config_to_hf(model.config, bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    state = model.state_dict()
    hf_config["dtype"] = hf_config["torch_dtype"] = dtype_name(state["tok_emb.weight"])
    tensors = {}
    for hf_name, (ours, transpose) in tensor_names(model.config).items():
        if ours in state:
            tensor = state[ours].detach().to("cpu")
        else:  # bias=False: the bias of the layer whose weight is `ours` with .weight, as zeros
            weight = state[ours.removesuffix(".bias") + ".weight"]
            tensor = torch.zeros(weight.shape[0], dtype=weight.dtype)
        prefix = "" if hf_name == "lm_head.weight" else "transformer."
        tensors[prefix + hf_name] = (tensor.t() if transpose else tensor).contiguous()
    write_checkpoint(path, hf_config, tensors, documents)
    log.info("saved GPT-2 checkpoint to %s", path)
    return Path(path)


def gather_tensors(names: dict[str, list[str]], tensors: dict[str, Tensor],
            shapes: dict[str, tuple]) -> tuple[dict[str, Tensor], list[str]]:
    """Our tensors from HF ones, and the problems (missing names, shapes the config contradicts)."""
    state, problems = {}, []
    for ours, theirs in names.items():
        missing = [n for n in theirs if n not in tensors]
        if missing:
            problems.append(f"missing tensor {missing[0]!r}")
            continue
        tensor = torch.cat([tensors[n] for n in theirs]) if len(theirs) > 1 else tensors[theirs[0]]
        if tuple(tensor.shape) != shapes[ours]:
            problems.append(f"{theirs[0]!r} has shape {tuple(tensors[theirs[0]].shape)}, config.json "
                            f"implies {shapes[ours]} for {ours}")
            continue
        state[ours] = tensor
    return state, problems


def read_safetensors(root: Path, rename: Callable[[str], str], hf_class: str
                     ) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Every tensor of an HF checkpoint folder under `rename(stored name)`, and each one's stored
    name. A folder with only pickled weights is refused (loading one can run arbitrary code) with
    the one-time conversion through `transformers.<hf_class>`."""
    if not any((root / n).is_file() for n in (WEIGHTS_FILE, INDEX_FILE)) and any(
            (root / n).is_file() for n in PICKLE_FILES):
        raise ValueError(f"{root} holds only pickled weights (pytorch_model.bin); tformer refuses pickles "
                         "because loading one can run arbitrary code. Convert it once, in an environment "
                         f"you trust: `transformers.{hf_class}.from_pretrained(path).save_pretrained(path, "
                         "safe_serialization=True)` writes model.safetensors")
    tensors: dict[str, Tensor] = {}
    stored: dict[str, str] = {}
    for file in sorted(set(weight_files(root).values())):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                tensors[rename(name)] = f.get_tensor(name)
                stored[rename(name)] = name
    return tensors, stored


def check_counts(hf: dict, keys: Sequence[str], where: str) -> None:
    """Sizes in an HF config.json (layers, heads, widths) are whole numbers >= 1 where given."""
    for key in keys:
        value = hf.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{key}={value!r} in {where} must be a whole number >= 1")


def check_empty_output(out_dir: Path) -> None:
    """An import writes a new run directory: an existing folder with anything in it (a trained run,
    the user's files) is refused before anything is written."""
    if out_dir.is_file():
        raise ValueError(f"{out_dir} is a file; give a new folder to write the converted run into")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise ValueError(f"{out_dir} is not empty; give a new folder (nothing in {out_dir} was changed)")


def load_checkpoint_tokenizer(path: str | os.PathLike) -> HFJsonTokenizer:
    """The tokenizer.json of an HF checkpoint folder; a clear error when it has none."""
    root = Path(path)
    if not (root / TOKENIZER_FILE).is_file():
        legacy = [name for name in ("vocab.txt", "vocab.json", "tokenizer.model") if (root / name).is_file()]
        hint = (f"it has {legacy[0]} but not tokenizer.json: write one in an environment with transformers, "
                "`AutoTokenizer.from_pretrained(path).save_pretrained(path)`" if legacy else
                "copy the tokenizer.json of the model it was trained from into it")
        raise FileNotFoundError(f"checkpoint directory {root} has no {TOKENIZER_FILE}, so its text cannot "
                                f"be tokenized; {hint}")
    return load_hf_tokenizer(root)


def write_run(out_dir: str | os.PathLike, model: nn.Module, source: str | os.PathLike,
              tokenizer: HFJsonTokenizer | None = None) -> Path:
    """A new tformer run directory (checkpoints/best, tokenizer.json when the model reads text)
    holding an imported model, which `tformer.runs.open_run` reads and recipes fine-tune from
    (`model.init_from`); written into a hidden sibling and renamed at the end."""
    out = Path(out_dir)
    check_empty_output(out)
    check_vocabulary(tokenizer, model.config, Path(source) / TOKENIZER_FILE)  # before anything is written
    record = {**model_record(model.config), "imported_from": str(Path(source).resolve())}
    if tokenizer is None:
        record[HAS_TOKENIZER] = False
    with atomic_directory(out) as staging:
        checkpoint.save(staging / "checkpoints" / "best", model, progress={"step": 0}, config=record)
        if tokenizer is not None:
            tokenizer.save(staging / TOKENIZER_FILE)
    log.info("converted %s into tformer run directory %s", source, out)
    return out


def convert_gpt2(path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write the HF GPT-2 checkpoint `path` (with its tokenizer.json) as a new tformer run directory."""
    check_empty_output(Path(out_dir))
    load_gpt2_config(path)  # a folder that is no GPT-2 checkpoint is named before its tokenizer
    tokenizer = load_checkpoint_tokenizer(path)
    return write_run(out_dir, load_gpt2(path), path, tokenizer)

"""LoRA runs (trained from a recipe with `model.lora`, see `training.build`) made into other things:

    merge_lora(run, out)           a plain run: adapters folded into the weights, no lora edit
    save_adapters(run, out)        the adapters alone: adapter.safetensors (lora_A/B and the task
                                   head's own weights) + adapter.json (the LoRA params and the
                                   model record they fit)
    attach_adapters(base, folder, out)   the base run + saved adapters -> the LoRA run again

Every output folder must be new or empty: nothing a user owns is overwritten. The runs are
written by `compress.output.write_run` (the source's run keys, so `tformer evaluate` and
`model.init_from` work, its step, "compressed_from" = the source checkpoint).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tformer.compress.output import RECORD_KEYS, SOURCE_KEY, check_new_folder, run_keys, write_run
from tformer.files import atomic_directory, read_json
from tformer.models.edits import EDITS_KEY, edit_params, edits_of, forget_edits, note_edit, replay_edits
from tformer.models.record import config_from_record, record_of
from tformer.models.registry import build_model
from tformer.nn import lora
from tformer.runs.run import Run, open_run
from tformer.training.build import HEAD_PREFIX

log = logging.getLogger(__name__)

ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter.safetensors", "adapter.json"
ADAPTER_FORMAT, ADAPTER_VERSION = "tformer-lora-adapter", 1
ADAPTERS_KEY = "adapters_from"  # run key of a run re-attached from saved adapters: their folder


def lora_edit(run: Run) -> dict[str, Any]:
    """The run's LoRA edit params; a run without adapters is one ValueError."""
    params = edit_params(run.model, "lora")
    if params is None:
        raise ValueError(f"{run.path} has no LoRA adapters (its model record holds no lora edit); train it "
                         "from a recipe with model.lora, e.g. bert-sentiment-minilm-lora")
    return params


def head_names(model: nn.Module) -> list[str]:
    """The task head's own tensors (`head.`; not ones tied to the rest, e.g. MLM decoder =
    embeddings): what a LoRA run trains besides the adapters."""
    shared = {id(p) for name, p in model.named_parameters(remove_duplicate=False) if not name.startswith(HEAD_PREFIX)}
    tied = {name for name, p in model.named_parameters(remove_duplicate=False) if id(p) in shared}
    return [name for name in model.state_dict() if name.startswith(HEAD_PREFIX) and name not in tied]


def base_fingerprint(state: dict[str, torch.Tensor], skip: set[str]) -> str:
    """sha256 over the base weights (names, dtypes, shapes, values) outside `skip` and the adapters:
    adapters attached to another base of the same shape would compute something else, silently."""
    digest = hashlib.sha256()
    for name in sorted(state):
        if name in skip or name.rsplit(".", 1)[-1] in lora.ADAPTER_NAMES:
            continue
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _without_lora(recipe: Any) -> Any:
    """A saved recipe whose model section trains no adapters (for a merged run)."""
    if not isinstance(recipe, dict) or not isinstance(recipe.get("model"), dict):
        return recipe
    return {**recipe, "model": {k: v for k, v in recipe["model"].items() if k != "lora"}}


def adapter_keys(keys: Any) -> dict[str, Any]:
    """The LoRA run's own run keys saved with its adapters (its recipe with model.lora, ...), for
    the run re-attached on a base; not the keys `write_run` writes itself."""
    if not isinstance(keys, dict):
        return {}
    return {k: v for k, v in keys.items() if k not in (*RECORD_KEYS, SOURCE_KEY)}


def merge_lora(run_path: str | Path, out: str | Path) -> Path:
    """Write the LoRA run as a plain run: every adapter folded into its weight (W + alpha/r B A),
    the lora edit gone from the record and `model.lora` from its recipe."""
    out = check_new_folder(out)
    run = open_run(run_path)
    lora_edit(run)
    edits = edits_of(run.model)
    last = max(i for i, e in enumerate(edits) if e["kind"] == "lora")
    if last != len(edits) - 1:
        raise ValueError(f"{run.path} was edited after LoRA ({edits[-1]['kind']}); merge the adapters before "
                         "editing the model further")
    merged = lora.remove_lora(run.model)
    forget_edits(run.model, "lora")
    write_run(run.model, run, out, extra_keys={"recipe": _without_lora(run.record.get("recipe"))})
    log.info("merged %d LoRA adapters of %s into the plain run %s", merged, run.path, out)
    return out


def save_adapters(run_path: str | Path, out: str | Path) -> Path:
    """Write the LoRA run's adapters (and its task head) alone: adapter.safetensors + adapter.json."""
    out = check_new_folder(out)
    run = open_run(run_path)
    params = lora_edit(run)
    state = run.model.state_dict()
    heads = head_names(run.model)
    tensors = {name: t.contiguous() for name, t in state.items() if name.rsplit(".", 1)[-1] in lora.ADAPTER_NAMES}
    tensors.update({name: state[name].contiguous() for name in heads})
    edits = edits_of(run.model)
    record = {**record_of(run.model), EDITS_KEY: [e for e in edits if e["kind"] != "lora"]}
    meta = {"format": ADAPTER_FORMAT, "version": ADAPTER_VERSION, "lora": params, "head": heads,
            "base_sha256": base_fingerprint(state, set(heads)), "model": record, "run": run_keys(run), "source": str(run.path)}
    with atomic_directory(out) as staging:
        save_file(tensors, str(staging / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (staging / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    n = sum(t.numel() for t in tensors.values())
    log.info("saved %d adapter tensors (%s numbers, head: %d tensors) of %s to %s", len(tensors), f"{n:,}",
             len(heads), run.path, out)
    return out


def read_adapters(folder: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """adapter.json and the tensors of a folder `save_adapters` wrote; anything else is one line."""
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise FileNotFoundError(f"{folder} does not exist; give a folder `tformer adapter RUN --save` wrote")
    if not (folder / ADAPTER_CONFIG).is_file() or not (folder / ADAPTER_WEIGHTS).is_file():
        raise ValueError(f"{folder} holds no tformer adapters ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS}); write them "
                         "with `tformer adapter RUN --save --out DIR`")
    meta = read_json(folder / ADAPTER_CONFIG, "adapter config")
    if meta.get("format") != ADAPTER_FORMAT or meta.get("version") != ADAPTER_VERSION:
        raise ValueError(f"{folder / ADAPTER_CONFIG} is not a tformer adapter file of version {ADAPTER_VERSION} "
                         f"(format {meta.get('format')!r}, version {meta.get('version')!r})")
    return meta, load_file(str(folder / ADAPTER_WEIGHTS))


def adapted_model(base: nn.Module, meta: dict[str, Any], tensors: dict[str, torch.Tensor],
                  where: str) -> nn.Module:
    """The model the adapters were trained on: their record's config (its task head), the base's
    weights everywhere else, then the adapters and the head. A base that does not fit is one line."""
    record = meta["model"]
    config = config_from_record(record, where=where)
    model = replay_edits(build_model(config), record.get(EDITS_KEY), where=where)
    if type(model) is not type(base):
        raise ValueError(f"the adapters in {where} were trained on a {type(model).__name__}, not a "
                         f"{type(base).__name__}")
    theirs, state = base.state_dict(), model.state_dict()
    heads = set(meta["head"])
    for name, tensor in state.items():
        if name in heads:
            continue
        if name not in theirs or theirs[name].shape != tensor.shape:
            got = "missing" if name not in theirs else f"shape {tuple(theirs[name].shape)}"
            raise ValueError(f"the base model does not fit the adapters in {where}: {name} is {got}, the "
                             f"adapters' model has {tuple(tensor.shape)}; give the run they were trained from")
        state[name] = theirs[name]
    if meta.get("base_sha256") not in (None, base_fingerprint(state, heads)):
        raise ValueError(f"the base model's weights are not the ones the adapters in {where} were trained on "
                         "(same shapes, other values); give the run they were trained from (see its \"source\")")
    model.load_state_dict(state)
    params = meta["lora"]
    lora.wrap(model, params["modules"], params["r"], params["alpha"], params.get("dropout", 0.0))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    wanted = {n for n in model.state_dict() if n.rsplit(".", 1)[-1] in lora.ADAPTER_NAMES} | heads
    absent = sorted(wanted & set(missing))
    if unexpected or absent:
        raise ValueError(f"{where} does not match its adapter.json: "
                         f"{'unexpected ' + unexpected[0] if unexpected else 'missing ' + absent[0]}")
    note_edit(model, "lora", params)
    return model.eval()


def attach_adapters(base_path: str | Path, adapters: str | Path, out: str | Path) -> Path:
    """Write base run + saved adapters as a LoRA run at `out` (equal to the one they came from
    when the base is the run it was fine-tuned from)."""
    out = check_new_folder(out)
    meta, tensors = read_adapters(adapters)
    base = open_run(base_path)
    model = adapted_model(base.model, meta, tensors, where=str(adapters))
    keys = {**adapter_keys(meta.get("run")), ADAPTERS_KEY: str(Path(adapters).expanduser().resolve())}
    write_run(model, base, out, extra_keys=keys)
    log.info("attached the adapters in %s to %s: %s", adapters, base.path, out)
    return out


__all__ = ["ADAPTERS_KEY", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "adapted_model", "adapter_keys", "attach_adapters",
           "head_names", "lora_edit", "merge_lora", "read_adapters", "save_adapters"]

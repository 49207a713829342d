"""Checkpoints: safetensors weights, optimizer/RNG state loaded with `weights_only=True`, JSON
config and progress, and a manifest of sizes and hashes. Nothing here unpickles code.

A checkpoint is a folder written atomically by `files.atomic_directory`: files go to a hidden
temporary folder (each fsynced), the old folder is moved aside, the new one renamed into place,
then the old one removed. A crash (or a full disk) at any moment leaves the old checkpoint or the
new one; `resolve` finds the one that survived a crash between the two renames.
"""

from __future__ import annotations

import errno
import json
import logging
import pickle
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import Tensor, nn

from tformer.files import atomic_directory, recover_directory, sha256_file

log = logging.getLogger(__name__)

WEIGHTS, STATE, PROGRESS, CONFIG, MANIFEST = ("model.safetensors", "train_state.pt", "progress.json",
                                              "config.json", "manifest.json")
REQUIRED = (WEIGHTS, CONFIG, PROGRESS)  # a manifest that lists fewer vouches for too little
SHA256 = re.compile(r"[0-9a-f]{64}")
# safetensors dtype codes of torch dtypes, and the casts that lose nothing (stored -> model)
DTYPE_CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
               torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
               torch.uint8: "U8", torch.bool: "BOOL"}
EXACT_WIDENING = {("F16", "F32"), ("F16", "F64"), ("BF16", "F32"), ("BF16", "F64"), ("F32", "F64")}


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupted; the message names the file."""


@dataclass
class Checkpoint:
    """What a checkpoint holds besides the weights (which are loaded into a model in place)."""

    path: Path
    progress: dict[str, Any]  # step, best validation loss, ... (JSON)
    config: dict[str, Any]  # the run's configuration (JSON)
    train_state: dict[str, Any] | None  # optimizer / scheduler / RNG / scaler (tensors + plain data)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")


def _save_weights(file: Path, weights: nn.Module | Mapping[str, Tensor]) -> None:
    """A model, or a whole state dict gathered from shards (FSDP2): shared (tied) tensors are
    stored once under their first name in sorted order, as `save_model` does for a model."""
    if isinstance(weights, nn.Module):
        save_model(weights, str(file))
        return
    names: dict[int, list[str]] = {}
    for name, tensor in weights.items():
        names.setdefault(id(tensor), []).append(name)
    kept, metadata = {}, {}
    for group in names.values():
        keep, *dropped = sorted(group)
        kept[keep] = weights[keep].contiguous()
        metadata.update({name: keep for name in dropped})
    save_file(kept, str(file), metadata=metadata or None)


def _write_files(tmp: Path, model: nn.Module | Mapping[str, Tensor], progress: dict[str, Any],
                 config: dict[str, Any], train_state: dict[str, Any] | None) -> None:
    _save_weights(tmp / WEIGHTS, model)
    if train_state is not None:
        torch.save(train_state, tmp / STATE)
    _write_json(tmp / PROGRESS, progress)
    _write_json(tmp / CONFIG, config)
    files = sorted(p.name for p in tmp.iterdir())
    _write_json(tmp / MANIFEST, {name: {"bytes": (tmp / name).stat().st_size,
                                        "sha256": sha256_file(tmp / name)} for name in files})


def _write_failure(path: Path, e: BaseException) -> str:
    """One line saying why writing the checkpoint at `path` failed. torch and safetensors report a
    full disk in their own words (RuntimeError "file write failed", SafetensorError "StorageFull")."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or any(
        s in str(e) for s in ("No space left", "StorageFull", "QuotaExceeded", "code: 28"))
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:,.0f} MiB free there"
    except OSError:
        free = "free space unknown"
    cause = "no space left on device" if full else text
    return (f"could not write checkpoint {path}: {cause} ({free}); the previous checkpoint there, if "
            "any, is kept as it was; free some space (or choose another run_dir) and try again")


def save(path: str | Path, model: nn.Module | Mapping[str, Tensor], *, progress: dict[str, Any],
         config: dict[str, Any], train_state: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint folder at `path` atomically (replacing an older one). `model`: a model
    or its whole state dict (tied tensors shared). A failure (a full disk above all) is one
    OSError / CheckpointError line and leaves the older folder untouched."""
    path = Path(path)
    try:
        with atomic_directory(path) as tmp:  # fsynced, swapped in by rename; see recover_directory
            _write_files(tmp, model, progress, config, train_state)
    except OSError as e:
        error = OSError(_write_failure(path, e))
        error.errno = e.errno
        raise error from None
    except (SafetensorError, RuntimeError) as e:  # torch's and safetensors' own I/O errors
        raise CheckpointError(_write_failure(path, e)) from None
    return path


def resolve(path: str | Path) -> Path | None:
    """The checkpoint folder at `path`, or the previous one if a crash came between the renames."""
    path = Path(path)
    return path if recover_directory(path, lambda folder: (folder / MANIFEST).is_file()) else None


def _is_plain_name(name: str) -> bool:
    """A file name inside the checkpoint folder (no folder part, nothing like "../x" or "/etc/x")."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name \
        and Path(name).name == name


def read_manifest(path: Path) -> dict[str, dict[str, Any]]:
    """The manifest, checked for shape: {file name: {"bytes": int, "sha256": hex}}, listing at
    least the weights, config and progress, and every checkpoint file the folder holds."""
    where = path / MANIFEST
    manifest = _read_object(path, MANIFEST)
    for name, entry in manifest.items():
        if not _is_plain_name(name):
            raise CheckpointError(f"{where} lists {name!r}, which is not a file of this folder; the "
                                  "manifest was edited or is not tformer's; use another checkpoint")
        if not (isinstance(entry, dict) and type(entry.get("bytes")) is int and entry["bytes"] >= 0
                and isinstance(entry.get("sha256"), str) and SHA256.fullmatch(entry["sha256"])):
            raise CheckpointError(f"{where}: the entry of {name} must be {{\"bytes\": size, \"sha256\": "
                                  f"hex digest}}, found {json.dumps(entry)[:80]}; was the manifest edited?")
    unlisted = [n for n in REQUIRED if n not in manifest] + \
        [n for n in (STATE,) if n not in manifest and (path / n).exists()]
    if unlisted:
        raise CheckpointError(f"{where} does not list {', '.join(unlisted)}: nothing vouches for "
                              "those files; the checkpoint is incomplete or was edited; use another one")
    return manifest


def verify(path: Path) -> None:
    """Check every file against the manifest; raise CheckpointError naming the first bad one."""
    if not (path / MANIFEST).is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint: {MANIFEST} is missing")
    for name, expected in read_manifest(path).items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is missing {name}")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(f"{file} is {size} bytes, the manifest says {expected['bytes']}: "
                                  "it was truncated or replaced; use another checkpoint (e.g. best/)")
        if sha256_file(file) != expected["sha256"]:
            raise CheckpointError(f"{file} does not match its checksum: it is corrupted; use "
                                  "another checkpoint (e.g. best/)")


def _read_json(path: Path, name: str) -> Any:
    """A JSON file of a checkpoint, with CheckpointError naming it when missing or corrupted."""
    try:
        return json.loads((path / name).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no {name}; is it a tformer checkpoint?") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, absurd nesting
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path / name} is corrupted ({reason})") from None


def _read_object(path: Path, name: str) -> dict[str, Any]:
    """A JSON file that must hold an object (config, progress, manifest)."""
    data = _read_json(path, name)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path / name} must hold a JSON object, found {type(data).__name__}; "
                              "it was edited or is not tformer's; use another checkpoint")
    return data


def load_config(path: str | Path) -> dict[str, Any]:
    return _read_object(Path(path), CONFIG)


def load_progress(path: str | Path) -> dict[str, Any]:
    return _read_object(Path(path), PROGRESS)


def stored_dtypes(file: Path) -> dict[str, str]:
    """Tensor name -> safetensors dtype code ("F32", "F16", ...), from the header alone."""
    try:
        with safe_open(str(file), framework="pt") as f:
            return {name: f.get_slice(name).get_dtype() for name in f.keys()}  # noqa: SIM118 (not iterable)
    except SafetensorError as e:
        raise CheckpointError(f"{file} cannot be read as safetensors ({e})") from None


def check_dtypes(file: Path, model: nn.Module) -> None:
    """Refuse weights stored in a dtype the model's cannot hold exactly (a float32 checkpoint into
    float16, floats into integers): load_state_dict would cast them silently. An exact widening
    (float16/bfloat16 -> float32) is loaded, with a warning, so half-precision exports still open."""
    stored, widened = stored_dtypes(file), []
    for name, tensor in model.state_dict().items():
        code, want = stored.get(name), DTYPE_CODES.get(tensor.dtype, str(tensor.dtype))
        if code is None or code == want:
            continue
        if (code, want) not in EXACT_WIDENING:
            raise CheckpointError(f"{file} stores {name} as {code} but the model holds {want}: loading "
                                  "would change the weights; was it converted by another tool?")
        widened.append(f"{code}->{want}")
    if widened:
        log.warning("%s: %d tensor(s) stored in lower precision are widened exactly (%s)", file,
                    len(widened), ", ".join(sorted(set(widened))))


def _names(names: Any) -> str:
    names = sorted(names)
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _load_weights(path: Path, model: nn.Module, device: torch.device | str) -> None:
    file = path / WEIGHTS
    check_dtypes(file, model)
    try:
        missing, unexpected = load_model(model, str(file), strict=False, device=str(device))
    except SafetensorError as e:
        raise CheckpointError(f"{file} cannot be read as safetensors ({e})") from None
    except RuntimeError as e:  # shape mismatches from load_state_dict
        raise CheckpointError(f"{file} does not fit this model ({str(e).splitlines()[-1].strip()}); "
                              "was it saved from another config?") from None
    if missing or unexpected:
        parts = [f"{len(missing)} tensor(s) missing ({_names(missing)})" if missing else "",
                 f"{len(unexpected)} unexpected ({_names(unexpected)})" if unexpected else ""]
        raise CheckpointError(f"{file} does not fit this model: {'; '.join(p for p in parts if p)}; "
                              "was it saved from another config?")


def read_weights(path: str | Path, model: nn.Module) -> dict[str, Tensor]:
    """The checkpoint's weights as a state dict on CPU (tied tensors stored once), after the
    dtype check against `model` (for a caller that scatters them itself: FSDP2's rank 0)."""
    file = Path(path) / WEIGHTS
    check_dtypes(file, model)
    try:
        return load_file(str(file))
    except SafetensorError as e:
        raise CheckpointError(f"{file} cannot be read as safetensors ({e})") from None


def load_train_state(path: Path, device: torch.device | str) -> dict[str, Any]:
    """train_state.pt with `weights_only=True`: tensors and plain data, never code."""
    file = path / STATE
    try:
        return torch.load(file, map_location=device, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{file} holds something other than tensors and plain data, so it was not "
                              "loaded (nothing in it ran); tformer does not write such files; resume from "
                              "another checkpoint or start afresh") from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise CheckpointError(f"{file} cannot be read ({str(e).strip().splitlines()[0] if str(e) else e!r})"
                              "; use another checkpoint") from None


def load(path: str | Path, model: nn.Module | None, *, with_train_state: bool = True,
         device: torch.device | str = "cpu") -> Checkpoint:
    """Verify the checkpoint, load its weights into `model` (strict; None: leave them to the
    caller, see `read_weights`) and return the rest."""
    path = Path(path)
    verify(path)
    if model is not None:
        _load_weights(path, model, device)
    train_state = None
    if with_train_state and (path / STATE).is_file():
        train_state = load_train_state(path, device)
    return Checkpoint(path, load_progress(path), load_config(path), train_state)

"""Checkpoints: safetensors weights, optimizer/RNG state loaded with `weights_only=True`, JSON
config and progress, and a manifest of sizes and hashes. Nothing here unpickles code.

A checkpoint is a folder written atomically by `files.atomic_directory`: files go to a hidden
temporary folder (each fsynced), the old folder is moved aside, the new one renamed into place,
then the old one removed. A crash at any moment leaves the old checkpoint or the new one;
`resolve` finds the one that survived a crash between the two renames.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from tformer.files import atomic_directory, recover_directory, sha256_file

WEIGHTS, STATE, PROGRESS, CONFIG, MANIFEST = ("model.safetensors", "train_state.pt", "progress.json",
                                              "config.json", "manifest.json")


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


def save(path: str | Path, model: nn.Module, *, progress: dict[str, Any], config: dict[str, Any],
         train_state: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint folder at `path` atomically (replacing an older one)."""
    path = Path(path)
    with atomic_directory(path) as tmp:  # fsynced, swapped in by rename; see recover_directory
        save_model(model, str(tmp / WEIGHTS))  # shared (tied) tensors are stored once
        if train_state is not None:
            torch.save(train_state, tmp / STATE)
        _write_json(tmp / PROGRESS, progress)
        _write_json(tmp / CONFIG, config)
        files = sorted(p.name for p in tmp.iterdir())
        _write_json(tmp / MANIFEST, {name: {"bytes": (tmp / name).stat().st_size,
                                            "sha256": sha256_file(tmp / name)} for name in files})
    return path


def resolve(path: str | Path) -> Path | None:
    """The checkpoint folder at `path`, or the previous one if a crash came between the renames."""
    path = Path(path)
    return path if recover_directory(path, lambda folder: (folder / MANIFEST).is_file()) else None


def verify(path: Path) -> None:
    """Check every file against the manifest; raise CheckpointError naming the first bad one."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint: {MANIFEST} is missing")
    manifest = _read_json(path, MANIFEST)
    for name, expected in manifest.items():
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
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path / name} is corrupted ({e})") from None


def load_config(path: str | Path) -> dict[str, Any]:
    return _read_json(Path(path), CONFIG)


def load_progress(path: str | Path) -> dict[str, Any]:
    return _read_json(Path(path), PROGRESS)


def load(path: str | Path, model: nn.Module, *, with_train_state: bool = True,
         device: torch.device | str = "cpu") -> Checkpoint:
    """Verify the checkpoint, load its weights into `model` (strict) and return the rest."""
    path = Path(path)
    verify(path)
    try:
        missing, unexpected = load_model(model, str(path / WEIGHTS), strict=False, device=str(device))
    except SafetensorError as e:
        raise CheckpointError(f"{path / WEIGHTS} cannot be read as safetensors ({e})") from None
    except RuntimeError as e:  # shape mismatches from load_state_dict
        raise CheckpointError(f"{path / WEIGHTS} does not fit this model ({str(e).splitlines()[-1]}); "
                              "was it saved from another config?") from None
    if missing or unexpected:
        raise CheckpointError(f"{path / WEIGHTS} does not fit this model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}; was it saved from another config?")
    train_state = None
    if with_train_state and (path / STATE).is_file():
        train_state = torch.load(path / STATE, map_location=device, weights_only=True)  # no code runs
    return Checkpoint(path, load_progress(path), load_config(path), train_state)

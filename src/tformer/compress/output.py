"""Where every compress command writes: one check for the output folder and one writer for an
edited run, so that pruned, quantized, merged and re-attached runs follow one policy.

    out = check_new_folder(out)              before any slow work: new or empty, else one line
    write_run(model, source, out, summary=report, extra_keys={"pruning": ...})

The run written (all or nothing: one rename of a staged folder, summary.json included):
    checkpoints/best   the model's record (family, config, edits) over the source's run keys
                       (recipe, training, has_tokenizer, data_sha256, init_from, ...) and
                       `extra_keys`; "compressed_from" is the resolved source checkpoint folder;
                       progress holds the source's step
    tokenizer.json     copied from the source run, when it has one
    summary.json       `summary`, when given
    the run marker     finished
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from tformer.files import atomic_directory
from tformer.models.edits import EDITS_KEY
from tformer.models.record import CONFIG_KEY, FAMILY_KEY, record_of
from tformer.runs import checkpoint
from tformer.runs.run import TOKENIZER_FILE, Run
from tformer.training import rundir

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
RECORD_KEYS = (FAMILY_KEY, CONFIG_KEY, EDITS_KEY)  # the model's own: written from the edited model
SOURCE_KEY = "compressed_from"


def check_new_folder(path: str | Path, option: str = "--out") -> Path:
    """`path` (user-expanded) when it is a new or empty folder; a file or a folder holding anything
    is one ValueError line, and nothing in it is touched."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option} {path} is a file; give a new or empty folder")
    if path.is_dir() and any(path.iterdir()):
        raise ValueError(f"{option} {path} is not empty; give a new or empty folder (nothing in it was changed)")
    return path


def run_keys(source: Run) -> dict[str, Any]:
    """The source's run keys (recipe, training, tokenizer flag, data notes, init_from ...): its
    record without the model's own keys."""
    return {k: v for k, v in source.record.items() if k not in RECORD_KEYS}


def source_step(source: Run) -> int:
    return int(checkpoint.load_progress(source.checkpoint).get("step", 0))


def write_run(model: nn.Module, source: Run, out: str | Path, *, summary: Mapping[str, Any] | None = None,
              extra_keys: Mapping[str, Any] | None = None) -> Path:
    """Write `model`, edited from the opened run `source`, as a run directory at the new or empty
    `out` (see the module docstring); `extra_keys` add to or replace the source's run keys (not
    the model record's). Returns `out`; on any failure `out` is left as it was."""
    out = check_new_folder(out)
    extra = dict(extra_keys or {})
    clash = sorted(set(extra) & {*RECORD_KEYS, SOURCE_KEY})
    if clash:
        raise ValueError(f"write_run: {', '.join(clash)} is written from the model and the source, not extra_keys")
    config = {**run_keys(source), **extra, **record_of(model),
              SOURCE_KEY: str(Path(source.checkpoint).resolve())}
    step = source_step(source)
    with atomic_directory(out) as staging:
        checkpoint.save(staging / "checkpoints" / "best", model, progress={"step": step}, config=config)
        tokenizer = Path(source.path) / TOKENIZER_FILE
        if tokenizer.is_file():
            shutil.copyfile(tokenizer, staging / TOKENIZER_FILE)
        if summary is not None:
            (staging / SUMMARY_FILE).write_text(json.dumps(dict(summary), ensure_ascii=False, indent=2) + "\n",
                                                encoding="utf-8")
        rundir.write_marker(staging, finished=True)
    log.info("wrote %s (from %s)", out, source.checkpoint)
    return out


__all__ = ["RECORD_KEYS", "SOURCE_KEY", "SUMMARY_FILE", "check_new_folder", "run_keys", "source_step", "write_run"]

"""int8 quantization of a model's linear layers for CPU inference, behind one function:
`quantize(model, "int8" | "int8-weight" | "auto", skip=...)` (kernels and schemes:
`nn.quantized`). `quantize_run` opens a run, quantizes it and writes a run that opens, classifies
and generates (KV cache included) like any other.

What is quantized by default: every `nn.Linear` but classification heads (modules named
`classifier` or `head`: a few outputs, no time to save, and they carry the decision). Language-model
heads are quantized: GPT-2's 50,257 x 768 head is 31% of its weights and a batch-1 decode step
reads every weight once, so int8 there is most of the gain (benchmarks/bench_quantize.py). A head
tied to the token embedding gets its own int8 copy; the embedding stays float (a lookup reads one
row). int4 is not offered: on this CPU `_weight_int4pack_mm_for_cpu` was no faster than the int8
kernels at batch 1 and needs every output width divisible by 16 (GPT-2's vocabulary is not).
"""

from __future__ import annotations

import fnmatch
import logging
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tformer.models.edits import EDITS_KEY, note_edit
from tformer.models.record import CONFIG_KEY, FAMILY_KEY, record_of
from tformer.nn.quantized import (
    DYNAMIC,
    SCHEMES,
    WEIGHT_ONLY,
    QuantizedLinear,
    kernel_available,
    swap_linears,
)
from tformer.runs import checkpoint
from tformer.runs.run import TOKENIZER_FILE, open_run
from tformer.training.rundir import write_marker

log = logging.getLogger(__name__)

NAMES = {"int8": DYNAMIC, DYNAMIC: DYNAMIC, WEIGHT_ONLY: WEIGHT_ONLY}  # what a user may ask for
CHOICES = ("auto", "int8", "int8-weight")
DEFAULT_SKIP = ("classifier", "head")


@dataclass(frozen=True)
class QuantizeReport:
    """What `quantize` did: the scheme, the layers quantized and kept, bytes before and after."""

    scheme: str
    modules: list[str]
    skipped: list[str]
    bytes_before: int
    bytes_after: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers, a tensor shared by two names counted once."""
    seen: dict[int, int] = {}
    for tensor in (*model.parameters(), *model.buffers()):
        seen[tensor.data_ptr()] = max(seen.get(tensor.data_ptr(), 0), tensor.numel() * tensor.element_size())
    return sum(seen.values())


def choose_scheme(scheme: str, device: torch.device) -> str:
    """The scheme `scheme` means on `device` ("auto": int8 dynamic where fbgemm is, else weight-only);
    one ValueError line when there is no kernel for it."""
    if scheme not in CHOICES and scheme not in NAMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; choose one of {', '.join(CHOICES)}")
    if device.type != "cpu":
        raise ValueError(f"int8 quantization runs on CPU kernels and the model is on {device}; move it to the "
                         "CPU first (model.cpu()) or keep it in float")
    wanted = [DYNAMIC, WEIGHT_ONLY] if scheme == "auto" else [NAMES[scheme]]
    for name in wanted:
        if kernel_available(name):
            return name
    raise ValueError(f"this PyTorch has no CPU kernel for {scheme} quantization (int8 dynamic needs fbgemm, "
                     "weight-only needs torch._weight_int8pack_mm); use another scheme or keep the model in float")


def _skipped(name: str, patterns: Sequence[str]) -> bool:
    leaf = name.rpartition(".")[2]
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(leaf, p) for p in patterns)


def quantize(model: nn.Module, scheme: str = "auto", skip: Sequence[str] = DEFAULT_SKIP) -> QuantizeReport:
    """Quantize the model's `nn.Linear` layers in place (all but those whose name or last name part
    matches a `skip` pattern, fnmatch style) and record the edit; returns what was done."""
    if isinstance(skip, str):
        skip = (skip,)
    params = next(iter(model.parameters()), None)
    chosen = choose_scheme(scheme, params.device if params is not None else torch.device("cpu"))
    if any(isinstance(m, QuantizedLinear) for m in model.modules()):
        raise ValueError("this model is already quantized; quantize the float run it came from")
    linears = [name for name, m in model.named_modules() if type(m) is nn.Linear]
    names = [n for n in linears if not _skipped(n, skip)]
    if not names:
        raise ValueError(f"no linear layer is left to quantize (skip={list(skip)} matches all {len(linears)})")
    before = model_bytes(model)
    swap_linears(model, names, chosen)
    note_edit(model, "quantize", {"scheme": chosen, "modules": names})
    report = QuantizeReport(chosen, names, [n for n in linears if n not in names], before, model_bytes(model))
    log.info("quantized %d linear layers to %s (kept in float: %s); %.1f MB -> %.1f MB", len(names), chosen,
             ", ".join(report.skipped) or "none", before / 1e6, report.bytes_after / 1e6)
    return report


def check_new_folder(out: Path) -> None:
    """A quantized run goes to a new or empty folder; anything else is refused, untouched."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a new or empty folder")
    if out.is_dir() and any(out.iterdir()):
        raise ValueError(f"--out {out} is not empty; give a new or empty folder (nothing in it was changed)")


def write_run(model: nn.Module, source: Any, out: str | Path, report: QuantizeReport) -> Path:
    """Write `model` (quantized from the opened run `source`) as a run directory at `out` (new or
    empty): checkpoints/best with the source's run keys (recipe, ...) and the model's record,
    the tokenizer copied, and the run marker."""
    out = Path(out)
    check_new_folder(out)
    keys = {k: v for k, v in source.record.items() if k not in (FAMILY_KEY, CONFIG_KEY, EDITS_KEY)}
    config = {**keys, **record_of(model), "compressed_from": str(Path(source.path).resolve()),
              "quantized": {"scheme": report.scheme, "modules": len(report.modules), "skipped": report.skipped}}
    progress = {"step": checkpoint.load_progress(source.checkpoint).get("step", 0)}
    out.mkdir(parents=True, exist_ok=True)
    checkpoint.save(out / "checkpoints" / "best", model, progress=progress, config=config)
    if (Path(source.path) / TOKENIZER_FILE).is_file():
        shutil.copyfile(Path(source.path) / TOKENIZER_FILE, out / TOKENIZER_FILE)
    write_marker(out, finished=True)
    log.info("wrote the quantized run %s", out)
    return out


def quantize_run(run_dir: str | Path, out: str | Path, scheme: str = "auto", skip: Sequence[str] = DEFAULT_SKIP,
                 which: str = "best") -> QuantizeReport:
    """Open `run_dir`, quantize its model and write the quantized run to `out` (new or empty)."""
    check_new_folder(Path(out))  # before the slow part
    source = open_run(run_dir, which)
    report = quantize(source.model, scheme, skip)
    write_run(source.model, source, out, report)
    return report


__all__ = ["CHOICES", "DEFAULT_SKIP", "SCHEMES", "QuantizeReport", "choose_scheme", "model_bytes", "quantize",
           "quantize_run", "write_run"]

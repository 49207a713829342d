"""int8 quantization of a model's linear layers for CPU inference, behind one function:
`quantize(model, "int8" | "int8-weight" | "auto", skip=...)` (kernels and schemes:
`nn.quantized`). `quantize_run` opens a run, quantizes it and writes a run that opens, classifies
and generates (KV cache included) like any other.

What is quantized by default (`skip=None`): every `nn.Linear` but the one that produces a
classifier's logits. A model is a classifier by capability, not by a module name: it has the
`models.protocols.Classifier` methods and class labels (a sequence classifier, `TextClassifier` or
`ImageClassifier`; a token tagger's per-token label layer too), and its logits layer is the last
`nn.Linear` with one output per label. It stays float because it has a few outputs (nothing to
save in time or size) and it alone makes the decision: int8 rounding there moves the logits that
are compared, with nothing after it to absorb the error. Language-model heads are quantized: GPT-2's 50,257 x 768 head is 31% of its weights and a batch-1 decode step
reads every weight once, so int8 there is most of the gain (benchmarks/bench_quantize.py). A head
tied to the token embedding gets its own int8 copy; the embedding stays float (a lookup reads one
row). int4 is not offered: on this CPU `_weight_int4pack_mm_for_cpu` was no faster than the int8
kernels at batch 1 and needs every output width divisible by 16 (GPT-2's vocabulary is not).
"""

from __future__ import annotations

import fnmatch
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tformer.compress.output import check_new_folder, write_run
from tformer.models.edits import note_edit
from tformer.models.protocols import Classifier
from tformer.nn.lora import lora_layers
from tformer.nn.quantized import (
    DYNAMIC,
    SCHEMES,
    WEIGHT_ONLY,
    QuantizedLinear,
    kernel_available,
    swap_linears,
)
from tformer.runs.run import open_run

log = logging.getLogger(__name__)

NAMES = {"int8": DYNAMIC, DYNAMIC: DYNAMIC, WEIGHT_ONLY: WEIGHT_ONLY}  # what a user may ask for
CHOICES = ("auto", "int8", "int8-weight")


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


def logits_layer(model: nn.Module) -> str | None:
    """The name of the `nn.Linear` that produces a classifier's logits (see the module docstring),
    None for a model without class labels. By capability: the `Classifier` protocol's methods and
    `labels`, not `can(model, Classifier)`, so that a token tagger (which disowns sentence
    classification) keeps its per-token label layer float as well."""
    if not isinstance(model, Classifier):
        return None
    try:
        n = len(model.labels)
    except (AttributeError, TypeError):  # a head without labels (masked LM, none)
        return None
    found = [name for name, m in model.named_modules() if type(m) is nn.Linear and m.out_features == n]
    return found[-1] if n and found else None


def default_skip(model: nn.Module) -> tuple[str, ...]:
    """What `quantize` keeps float when told nothing: the classifier's logits layer, if any."""
    name = logits_layer(model)
    return () if name is None else (name,)


def check_quantizable(model: nn.Module) -> None:
    """A model quantize can take as it is; else one ValueError line (nothing changed)."""
    if lora_layers(model):  # its adapted layers are LoRALinear, not nn.Linear: they would stay float
        raise ValueError("this model has LoRA adapters, which quantize cannot hold; merge the adapters first: "
                         "tformer adapter RUN --merge --out DIR")
    if any(isinstance(m, QuantizedLinear) for m in model.modules()):
        raise ValueError("this model is already quantized; quantize the float run it came from")


def quantize(model: nn.Module, scheme: str = "auto", skip: Sequence[str] | None = None) -> QuantizeReport:
    """Quantize the model's `nn.Linear` layers in place and record the edit; returns what was done.
    `skip`: fnmatch patterns (whole name or its last part) of layers kept float, each of which must
    match a linear layer; None keeps the classifier's logits layer float (`default_skip`), ()
    quantizes every linear layer."""
    if isinstance(skip, str):
        skip = (skip,)
    params = next(iter(model.parameters()), None)
    chosen = choose_scheme(scheme, params.device if params is not None else torch.device("cpu"))
    check_quantizable(model)
    linears = [name for name, m in model.named_modules() if type(m) is nn.Linear]
    skip = default_skip(model) if skip is None else tuple(skip)
    for pattern in skip:
        if not any(_skipped(n, (pattern,)) for n in linears):
            example = linears[0] if linears else "none"
            raise ValueError(f"skip pattern {pattern!r} matches no linear layer (whole name or last part, "
                             f"e.g. {example!r} or {example.rpartition('.')[2]!r})")
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


def quantize_run(run_dir: str | Path, out: str | Path, scheme: str = "auto", skip: Sequence[str] | None = None,
                 which: str = "best") -> QuantizeReport:
    """Open `run_dir`, quantize its model and write the quantized run to `out` (new or empty;
    `compress.output.write_run`: the source's run keys and step, summary.json)."""
    out = check_new_folder(out)  # before the slow part
    source = open_run(run_dir, which)
    report = quantize(source.model, scheme, skip)
    summary = {"source": str(source.path), "date": time.strftime("%Y-%m-%d %H:%M:%S"), **report.to_dict()}
    write_run(source.model, source, out, summary=summary,
              extra_keys={"quantized": {"scheme": report.scheme, "modules": len(report.modules),
                                        "skipped": report.skipped}})
    log.info("wrote the quantized run %s", out)
    return report


__all__ = ["CHOICES", "SCHEMES", "QuantizeReport", "check_quantizable", "choose_scheme", "default_skip",
           "logits_layer", "model_bytes", "quantize", "quantize_run"]

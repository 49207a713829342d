"""Structured pruning of attention heads and feed-forward units, for every family: score each head
and unit, remove the least important ones from the weights (smaller matrices, so faster on any
device), record the edit so that the pruned run saves, opens, generates, evaluates and fine-tunes
like any other.

    report = prune(model, heads=0.5, neurons=0.5, importance="gradient", batches=..., loss=task.loss)
    out, report = prune_run("runs/minilm-sentiment", "runs/minilm-pruned", heads=0.5, neurons=0.5)

Importance:
    gradient   |d loss / d gate| accumulated over validation batches, with a gate of ones on every
               head and unit (Michel et al. 2019, "Are Sixteen Heads Really Better than One?", eq. 2;
               the same for units), with the run's own task loss
    magnitude  the L2 norm of the weights that belong to a head or unit alone

Scope: "layer" removes the share from every layer (rounded down, so a layer keeps at least one
head); "global" ranks all heads (all units) of the model together after normalising each
layer's scores by their L2 norm (Michel et al. 2019, section 4.1), and refuses a plan that
empties a layer. Grouped-query attention is pruned in whole groups (a key/value head and its
query heads), multi-query attention (one key/value head) in query heads.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tformer.compress.output import SUMMARY_FILE, check_new_folder, write_run
from tformer.config import check_choice
from tformer.models.edits import note_edit
from tformer.nn.lora import lora_layers
from tformer.nn.pruning import gates, head_modules, magnitude, unit_modules
from tformer.nn.quantized import QuantizedLinear
from tformer.runs.run import TOKENIZER_FILE, open_run
from tformer.training.recipe import recipe_from_dict, saved_for_evaluation, task_module, tokenizer_maker

log = logging.getLogger(__name__)

IMPORTANCES = ("gradient", "magnitude")
SCOPES = ("layer", "global")
DEFAULT_BATCHES = 8


@dataclass
class PrunedModule:
    """One module's heads or units before and after."""

    name: str
    kind: str  # "heads" | "units"
    before: int
    after: int


@dataclass
class PruneReport:
    importance: str
    scope: str
    heads: float  # the share asked for
    neurons: float
    batches: int  # validation batches the gradient importance read (0 for magnitude)
    parameters_before: int
    parameters_after: int
    modules: list[PrunedModule] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- checks ----------------------------------------------------------------------------------------
def check_share(share: Any, what: str) -> float:
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 <= share < 1.0:
        raise ValueError(f"the share of {what} to prune must be in [0, 1), got {share!r} (0.5 prunes half)")
    return float(share)


def check_prunable(model: nn.Module) -> None:
    """Pruning slices float `nn.Linear` weights: a model with LoRA adapters or int8 layers is one
    ValueError line, before any work."""
    if lora_layers(model):
        raise ValueError("this model has LoRA adapters; merge them first (tformer adapter RUN --merge --out DIR) "
                         "and prune the merged run, or prune the base run and train the adapters on it")
    if any(isinstance(m, QuantizedLinear) for m in model.modules()):
        raise ValueError("this model is quantized; prune the float run it came from, then quantize the pruned run")


def check_options(heads: Any, neurons: Any, importance: str, scope: str) -> tuple[float, float]:
    check_choice("importance", importance, IMPORTANCES)
    check_choice("scope", scope, SCOPES)
    return check_share(heads, "heads"), check_share(neurons, "neurons")


# -- importance ------------------------------------------------------------------------------------
def gradient_importance(model: nn.Module, batches: Iterable[Any], loss: Callable[[nn.Module, Any], Tensor],
                        max_batches: int | None = None) -> tuple[dict[str, Tensor], int]:
    """{module name: mean over batches of |d loss / d gate|} for every head and unit module, and
    the number of batches read. Weights get no gradients; the model runs in eval mode."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    device = next(model.parameters()).device
    totals: dict[str, Tensor] = {}
    n = 0
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        with gates(model) as found:
            names, values = list(found), list(found.values())
            for batch in itertools.islice(batches, max_batches):
                batch = batch.to(device) if hasattr(batch, "to") else batch
                grads = torch.autograd.grad(loss(model, batch), values, allow_unused=True)
                for name, grad in zip(names, grads):
                    score = torch.zeros_like(found[name]) if grad is None else grad.detach().abs()
                    totals[name] = totals.get(name, 0) + score
                n += 1
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    if n == 0:
        raise ValueError("gradient importance needs at least one validation batch; the task gave none "
                         "(use importance='magnitude')")
    return {name: total / n for name, total in totals.items()}, n


def magnitude_importance(model: nn.Module) -> dict[str, Tensor]:
    return {name: magnitude(m) for name, m in {**head_modules(model), **unit_modules(model)}.items()}


# -- planning --------------------------------------------------------------------------------------
def group_size(module: nn.Module) -> int:
    """Heads removed together: a whole group under grouped-query attention, else one head."""
    n, n_kv = module.n_heads, getattr(module, "n_kv_heads", module.n_heads)
    return n // n_kv if 1 < n_kv < n else 1


def _lowest(scores: Tensor, count: int) -> list[int]:
    order = sorted(range(len(scores)), key=lambda i: (float(scores[i]), i))  # ties: lower index first
    return order[:count]


def plan(modules: dict[str, nn.Module], scores: dict[str, Tensor], share: float, scope: str,
         what: str) -> dict[str, list[int]]:
    """{module name: heads/units to keep} for removing `share` of them (see the module doc)."""
    sizes = {name: group_size(m) if what == "heads" else 1 for name, m in modules.items()}
    unit_scores = {name: scores[name].float().cpu().view(-1, sizes[name]).sum(1) for name in modules}
    removed: dict[str, set[int]] = {name: set() for name in modules}
    if scope == "layer":
        for name, s in unit_scores.items():
            removed[name] = set(_lowest(s, int(share * len(s))))
    else:
        pooled = [(float(s[i] / s.norm().clamp_min(1e-12)), name, i)  # Michel et al.: per-layer L2
                  for name, s in unit_scores.items() for i in range(len(s))]
        for _, name, i in sorted(pooled, key=lambda t: t[0])[:int(share * len(pooled))]:
            removed[name].add(i)
        for name, s in unit_scores.items():
            if len(removed[name]) == len(s):
                raise ValueError(f"pruning {share:.0%} of the {what} globally would remove every one of {name}; "
                                 f"lower the share or use scope 'layer'")
    keep = {}
    for name, s in unit_scores.items():
        units = [i for i in range(len(s)) if i not in removed[name]]
        keep[name] = [u * sizes[name] + j for u in units for j in range(sizes[name])]
    return keep


# -- pruning ---------------------------------------------------------------------------------------
def prune(model: nn.Module, *, heads: float = 0.0, neurons: float = 0.0, importance: str = "gradient",
          batches: Iterable[Any] | None = None, loss: Callable[[nn.Module, Any], Tensor] | None = None,
          scope: str = "layer", max_batches: int | None = DEFAULT_BATCHES) -> PruneReport:
    """Remove `heads` (share) of the attention heads and `neurons` of the feed-forward units of
    `model`, in place, the least important first; record the edit; return what was kept.
    Gradient importance needs `batches` (validation batches) and `loss(model, batch)`."""
    heads, neurons = check_options(heads, neurons, importance, scope)
    check_prunable(model)
    attn, ffn = head_modules(model), unit_modules(model)
    if not attn and not ffn:
        raise ValueError(f"{type(model).__name__} has no attention heads or feed-forward units to prune")
    before = sum(p.numel() for p in model.parameters())
    n_batches = 0
    if importance == "gradient" and (heads or neurons):
        if batches is None or loss is None:
            raise ValueError("gradient importance needs validation batches and the task's loss "
                             "(or use importance='magnitude')")
        scores, n_batches = gradient_importance(model, batches, loss, max_batches)
    else:
        scores = magnitude_importance(model)
    keep = {**plan(attn, scores, heads, scope, "heads"), **plan(ffn, scores, neurons, scope, "units")}
    report = PruneReport(importance, scope, heads, neurons, n_batches, before, before)
    edited: dict[str, dict[str, Any]] = {}
    for name, module in {**attn, **ffn}.items():
        kind = "heads" if name in attn else "units"
        n = module.n_heads if kind == "heads" else module.n_units
        if len(keep[name]) < n:
            if kind == "heads":
                module.keep_heads(keep[name])
                edited[name] = {"heads": module.n_heads, "kv_heads": getattr(module, "n_kv_heads", module.n_heads),
                                "head_ids": module.head_ids.tolist()}
            else:
                module.keep_units(keep[name])
                edited[name] = {"units": module.n_units}
        report.modules.append(PrunedModule(name, kind, n, len(keep[name])))
    if edited:
        note_edit(model, "prune", {"modules": edited, "importance": importance, "scope": scope})
    report.parameters_after = sum(p.numel() for p in model.parameters())
    log.info("pruned %s: %s -> %s parameters", type(model).__name__, f"{before:,}",
             f"{report.parameters_after:,}")
    return report


# -- runs ------------------------------------------------------------------------------------------
def task_of(run: Any) -> Any:
    """The validation batches and loss of the task the run was trained with (its saved recipe and
    tokenizer), bound to the run's model."""
    if run.recipe is None:
        raise ValueError(f"{run.path} holds an imported model without a recipe, so there is no task loss "
                         "for gradient importance; use importance 'magnitude' or prune a fine-tuned run")
    recipe = recipe_from_dict(saved_for_evaluation(run.recipe), where=f"{run.path} (saved recipe)")
    recipe = dataclasses.replace(recipe, run_dir=str(run.path))
    saved = run.path / TOKENIZER_FILE
    data = task_module(recipe.task).prepare(recipe.settings,
                                            tokenizer_maker(recipe.tokenizer, saved if saved.is_file() else None))
    return data.make_task(run.model)


def prune_run(source: str | Path, out: str | Path, *, heads: float = 0.0, neurons: float = 0.0,
              importance: str = "gradient", scope: str = "layer", max_batches: int | None = DEFAULT_BATCHES,
              which: str = "best") -> tuple[Path, PruneReport]:
    """Open the run `source`, prune its model and write it as a new run directory `out`
    (`compress.output.write_run`: the source's run keys, its step, summary.json)."""
    check_options(heads, neurons, importance, scope)
    out = check_new_folder(out)
    run = open_run(source, which)
    check_prunable(run.model)  # before the task's data is prepared
    batches = loss = None
    if importance == "gradient" and (heads or neurons):
        task = task_of(run)
        batches, loss = task.eval_batches(0, 1), task.loss
    report = prune(run.model, heads=heads, neurons=neurons, importance=importance, batches=batches,
                   loss=loss, scope=scope, max_batches=max_batches)
    summary = {"source": str(run.path), "date": time.strftime("%Y-%m-%d %H:%M:%S"), **report.to_dict()}
    write_run(run.model, run, out, summary=summary,
              extra_keys={"pruning": {k: v for k, v in report.to_dict().items() if k != "modules"}})
    log.info("wrote the pruned run %s", out)
    return out, report


__all__ = ["IMPORTANCES", "SCOPES", "SUMMARY_FILE", "PruneReport", "PrunedModule", "check_options", "check_prunable",
           "check_share", "gradient_importance", "magnitude_importance", "plan", "prune", "prune_run", "task_of"]

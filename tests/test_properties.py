"""Property tests over what a careless or hostile user can type: recipe overrides, recipe files
and generation arguments. Each attempt ends in a valid result or the tool's own error type
(ConfigError / ValueError / OSError) with a one-line message; never another exception, and never
a changed file in the run directory it names."""

from __future__ import annotations

import dataclasses
import math
import tempfile
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import yaml

pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tformer.config import ConfigError  # noqa: E402
from tformer.inference.beam import beam_search  # noqa: E402
from tformer.inference.generate import Sampling, generate  # noqa: E402
from tformer.models import build_model  # noqa: E402
from tformer.models.registry import FAMILIES  # noqa: E402
from tformer.training.recipe import SECTIONS, load_recipe, task_module  # noqa: E402

RECIPES = sorted((Path(__file__).resolve().parents[1] / "src" / "tformer" / "recipes").glob("*.yaml"))
TOOL_ERRORS = (ConfigError, ValueError, OSError)
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def outcome(attempt: Callable[[], Any]) -> Any:
    """The attempt's result, or None after one of the tool's errors with a one-line message.
    Any other exception propagates and fails the test."""
    try:
        return attempt()
    except TOOL_ERRORS as e:
        message = str(e)
        assert message.strip(), f"{type(e).__name__} without a message"
        assert "\n" not in message, f"a message of several lines: {message!r}"
        return None


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_folder(root: Path) -> Path:
    """A run directory holding a user's files, which loading a recipe must never touch."""
    folder = root / "run"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "mine.bin").write_bytes(b"user data")
    (folder / "notes.txt").write_text("keep me")
    return folder


# --- values a user types --------------------------------------------------------------------------

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10, 10), st.integers(-2**70, 2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.floats(-2.0, 2.0),
    st.text(max_size=12), st.sampled_from(["<eos>", "gpt-nano", "cpu", "cosine", "char", "bpe", "[CLS]",
                                           "auto", "digits", "~", "", " ", "1e-3", ".inf", ".nan"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=6)


def as_yaml(value: Any) -> str:
    """The text of a value as one would type it after `key=`."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6)
    return text.removesuffix("\n").removesuffix("\n...").strip()


def section_keys() -> list[str]:
    """Every `section.key` the shipped recipes' sections have (data keys of every task, model keys
    of every family), and the top-level keys."""
    keys = {"run_dir", "task"}
    for name, cls in SECTIONS.items():
        if cls is not None:
            keys |= {f"{name}.{f.name}" for f in dataclasses.fields(cls)}
    for path in RECIPES:
        task = yaml.safe_load(path.read_text())["task"]
        keys |= {f"data.{f.name}" for f in dataclasses.fields(task_module(task).DataSpec)}
    for config_cls, _ in FAMILIES.values():
        keys |= {f"model.{f.name}" for f in dataclasses.fields(config_cls)}
    return sorted(keys | {"model.preset", "model.init_from", "model.freeze"})


KEYS = section_keys()


# --- (a) recipe overrides -------------------------------------------------------------------------

@FAST
@given(recipe=st.sampled_from(RECIPES), key=st.sampled_from(KEYS),
       raw=st.one_of(values.map(as_yaml), st.text(max_size=20)))
def test_any_override_is_a_recipe_or_one_line(recipe: Path, key: str, raw: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = run_folder(Path(tmp))
        before = snapshot(folder)
        loaded = outcome(lambda: load_recipe(recipe, [f"run_dir={folder}", f"{key}={raw}"]))
        assert snapshot(folder) == before
    if loaded is not None:
        assert loaded.task in yaml.safe_load(recipe.read_text())["task"] or key == "task"
        for value in dataclasses.asdict(loaded.training).values():
            assert not isinstance(value, float) or math.isfinite(value)
        assert all(isinstance(t, str) for t in loaded.tokenizer.special_tokens)


@FAST
@given(recipe=st.sampled_from(RECIPES), overrides=st.lists(
    st.tuples(st.sampled_from(KEYS), values.map(as_yaml)).map(lambda kv: f"{kv[0]}={kv[1]}"), max_size=4))
def test_several_overrides_together(recipe: Path, overrides: list[str]) -> None:
    outcome(lambda: load_recipe(recipe, overrides))


# --- (b) recipe files -----------------------------------------------------------------------------

section_names = st.one_of(st.sampled_from(list(SECTIONS)), st.text(max_size=8))
sections = st.one_of(values, st.dictionaries(st.sampled_from([k.split(".")[-1] for k in KEYS]), values,
                                             max_size=4))
recipe_mappings = st.one_of(
    st.dictionaries(section_names, sections, max_size=6),
    st.builds(lambda task, model, extra: {"task": task, "model": model, **extra},
              st.sampled_from(["causal_lm", "classification", "seq2seq", "image_classification",
                               "image_generation", "masked_lm", "segment_lm", "nope"]),
              st.one_of(st.fixed_dictionaries({"preset": st.sampled_from(["gpt-nano", "bert-tiny", "vit-digits",
                                                                          "seed-sketch"])}), values),
              st.dictionaries(st.sampled_from(["data", "training", "tokenizer", "sample"]), sections,
                              max_size=3)))


@FAST
@given(mapping=recipe_mappings)
def test_any_recipe_file_is_a_recipe_or_one_line(mapping: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = run_folder(Path(tmp))
        mapping = {**mapping, "run_dir": str(folder)} if "run_dir" not in mapping else mapping
        path = Path(tmp) / "recipe.yaml"
        path.write_text(yaml.safe_dump(mapping, allow_unicode=True), encoding="utf-8")
        before = snapshot(folder)
        outcome(lambda: load_recipe(path))
        assert snapshot(folder) == before


@FAST
@given(text=st.one_of(st.text(max_size=80), st.binary(max_size=40).map(lambda b: b.decode("latin-1"))))
def test_any_text_as_a_recipe_file_is_a_recipe_or_one_line(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "recipe.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        outcome(lambda: load_recipe(path))


# --- (c) generation arguments on a tiny GPT -------------------------------------------------------

VOCAB, CONTEXT = 13, 16


@pytest.fixture(scope="module")
def gpt() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("gpt-nano", vocab_size=VOCAB, context_length=CONTEXT, n_layers=1, d_model=16,
                       n_heads=2).eval()


numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 300),
                    st.sampled_from([0, 0.5, 1, 1.5, True, "1", None, [1.0]]))
sizes = st.one_of(st.integers(-2, 20), st.sampled_from([10**6, 2**63, 2.0, 3.5, True, "4", None]))


def sampling_of(fields: dict) -> Sampling:
    return Sampling(**{k: v for k, v in fields.items() if v is not ...})


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fields=st.fixed_dictionaries({"temperature": st.one_of(st.just(...), numbers),
                                     "top_k": st.one_of(st.just(...), numbers),
                                     "top_p": st.one_of(st.just(...), numbers),
                                     "repetition_penalty": st.one_of(st.just(...), numbers)}),
       max_new_tokens=sizes, sliding=st.booleans())
def test_any_sampling_arguments_generate_or_are_one_line(gpt, fields: dict, max_new_tokens: Any,
                                                          sliding: bool) -> None:
    out = outcome(lambda: generate(gpt, [[1, 2, 3]], max_new_tokens, sampling_of(fields), seed=0,
                                   sliding=sliding))
    if out is not None:
        assert out.shape[0] == 1 and 3 < out.shape[1] <= 3 + max_new_tokens
        assert int(out.min()) >= 0 and int(out.max()) < VOCAB


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(width=sizes | st.integers(1, 300) | st.just(100_000), max_new_tokens=sizes,
       n_best=st.one_of(st.integers(-1, 4), st.just(1.0)), length_penalty=numbers,
       eos=st.one_of(st.none(), st.integers(-2, VOCAB + 1)))
def test_any_beam_arguments_search_or_are_one_line(gpt, width: Any, max_new_tokens: Any, n_best: Any,
                                                   length_penalty: Any, eos: Any) -> None:
    hyps = outcome(lambda: beam_search(gpt, [[1, 2]], width, max_new_tokens, n_best=n_best,
                                       length_penalty=length_penalty, eos_token=eos))
    if hyps is not None:
        assert len(hyps) == 1 and 1 <= len(hyps[0]) <= n_best
        for h in hyps[0]:
            assert all(0 <= t < VOCAB for t in h.tokens) and 1 <= len(h.tokens) <= max_new_tokens
            assert math.isfinite(h.score)

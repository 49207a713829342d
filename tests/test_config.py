"""Recipe values are checked by type and range: a lone item for a list field is that item (never
its characters), NaN and infinity are refused, a warm-up longer than the run is refused, and every
refusal is one ConfigError line naming the key and what it must be."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from tformer.config import ConfigError, from_dict
from tformer.training.build import ModelSpec
from tformer.training.recipe import load_recipe
from tformer.training.settings import TokenizerSpec, TrainConfig

RECIPES = Path(__file__).resolve().parents[1] / "src" / "tformer" / "recipes"
BPE = RECIPES / "gpt-shakespeare-bpe.yaml"


def refused(overrides: list[str], match: str, recipe: Path = BPE) -> str:
    with pytest.raises(ConfigError, match=match) as caught:
        load_recipe(recipe, overrides)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_a_string_for_a_list_field_is_one_item_not_its_characters() -> None:
    recipe = load_recipe(BPE, ["tokenizer.special_tokens=<eos>"])
    assert recipe.tokenizer.special_tokens == ("<eos>",)
    assert load_recipe(BPE, ["tokenizer.special_tokens=[<eos>, <pad>]"]).tokenizer.special_tokens == (
        "<eos>", "<pad>")
    refused(["data.labels=pos"], r"data.labels=\['pos'\] names one class", RECIPES / "bert-sentiment.yaml")
    assert TokenizerSpec(special_tokens="<eos>").special_tokens == ("<eos>",)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["5", "{a: 1}", "[1, 2]", "null"])
def test_a_wrong_type_for_a_list_field_names_the_key_and_type(value: str) -> None:
    message = refused([f"tokenizer.special_tokens={value}"], "special_tokens=")
    assert "must be of type list of str (or one item)" in message


def test_fixed_length_tuples_need_every_item() -> None:
    @dataclass(frozen=True)
    class Pair:
        columns: tuple[int, int] = (0, 1)

    assert from_dict(Pair, {"columns": [2, 3]}).columns == (2, 3)
    for bad in (2, [1], [1, 2, 3], ["a", 1]):
        with pytest.raises(ConfigError, match=r"columns=.* must be of type list of 2 items \(int, int\)"):
            from_dict(Pair, {"columns": bad})


@pytest.mark.parametrize("override", ["training.lr=.inf", "training.lr=.nan", "training.min_lr=.nan",
                                      "training.weight_decay=.inf", "training.beta1=.nan",
                                      "training.grad_clip=-.inf", "model.dropout=.nan"])
def test_nan_and_infinity_are_refused_in_every_float_field(override: str) -> None:
    key = override.split("=")[0].split(".")[1]
    refused([override], rf"{key}=\S+ in the \w+ section of .* must be of type finite float"
            if not override.startswith("model") else f"{key}.*finite")


def test_float_fields_built_in_python_are_checked_too() -> None:
    for field in ("lr", "weight_decay", "grad_clip", "beta2"):
        with pytest.raises(ConfigError, match=f"training.{field} must be a finite number"):
            TrainConfig(**{field: float("nan")})


@pytest.mark.parametrize("override, match", [
    ("training.grad_clip=-1", r"training.grad_clip must be >= 0, got -1"),
    ("training.weight_decay=-0.1", r"training.weight_decay must be >= 0, got -0.1"),
    ("training.beta2=1.5", r"training.beta2 must be in \[0, 1\)"),
])
def test_negative_clip_and_decay_and_betas_outside_0_1_are_refused(override: str, match: str) -> None:
    refused([override], match)


def test_a_warmup_longer_than_the_run_is_refused_with_the_fix() -> None:
    message = refused(["training.max_steps=50", "training.warmup_steps=500"],
                      r"training.warmup_steps \(500\) is longer than the run")
    assert "set training.warmup_steps <= 50" in message
    assert load_recipe(BPE, ["training.max_steps=50", "training.warmup_steps=50"]).training.warmup_steps == 50


def test_the_default_warmup_fits_a_short_run() -> None:
    assert TrainConfig(max_steps=20).warmup_steps == 20
    assert TrainConfig(max_steps=5000).warmup_steps == 100
    assert TrainConfig(max_steps=20, warmup_steps=0).warmup_steps == 0


@pytest.mark.parametrize("preset", [5, ["gpt-nano"], {"a": 1}, None, "", 1.5])
def test_a_non_string_preset_is_one_line(preset: object) -> None:
    with pytest.raises(ConfigError, match=r"model.preset in recipe must be a preset or family name \(a string"):
        ModelSpec.from_section({"preset": preset})


@pytest.mark.parametrize("section, match", [
    ({"preset": "gpt-nano", "freeze": 5}, "model.freeze in recipe must be a parameter prefix"),
    ({"preset": "gpt-nano", "freeze": [1, "a"]}, "model.freeze in recipe must be"),
    ({"preset": "gpt-nano", "init_from": 3}, "model.init_from in recipe must be a run directory"),
])
def test_freeze_and_init_from_of_the_wrong_type_are_one_line(section: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ModelSpec.from_section(section)


def test_a_preset_override_of_the_wrong_type_is_refused_when_the_recipe_loads() -> None:
    refused(["model.preset=[a, b]"], "model.preset in .* must be a preset or family name")


def test_a_missing_required_field_is_a_config_error_not_a_type_error() -> None:
    @dataclass(frozen=True)
    class Needs:
        name: str

    with pytest.raises(ConfigError, match="Needs needs 'name'"):
        from_dict(Needs, {})


def test_a_model_too_large_for_memory_is_refused_before_it_is_built(monkeypatch) -> None:
    from tformer.runs import memory
    from tformer.training.build import build

    monkeypatch.setattr(memory, "available_memory", lambda: 1 << 16)  # 64 KiB free
    spec = ModelSpec.from_section({"preset": "gpt-nano", "n_layers": 2})
    with pytest.raises(ConfigError, match=r"the model of preset 'gpt-nano' .* needs [\d.]+ KiB of memory"
                                          r".* x 4.*, but 64.0 KiB is available; lower model.n_layers"):
        build(spec, {"vocab_size": 50}, seed=0)
    monkeypatch.setattr(memory, "available_memory", lambda: 1 << 40)
    model, _ = build(spec, {"vocab_size": 50}, seed=0)
    assert model.config.n_layers == 2


@pytest.mark.parametrize("text, match", [
    ("\x1f", "is not valid YAML: unacceptable character"),  # was a message of three lines
    ("?", "unknown section None"),  # a null key: was a TypeError from the suggestion
    ("{1: 2}", "unknown section 1"),
])
def test_a_malformed_recipe_file_is_one_line(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=match) as caught:
        load_recipe(path)
    assert "\n" not in str(caught.value)

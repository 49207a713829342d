"""models.edits: a model's edits travel in its record and are replayed (or refused in one line)."""

import pytest

from tformer.config import ConfigError
from tformer.models import build_model, model_from_record, model_record, record_of
from tformer.models.edits import EDITS_KEY, REPLAYS, edits_of, note_edit, replay_edits


def tiny():
    return build_model("gpt-nano", vocab_size=32)


def test_a_model_as_built_has_no_edits_and_its_record_no_edits_key():
    model = tiny()
    assert edits_of(model) == []
    assert EDITS_KEY not in record_of(model)
    assert record_of(model) == model_record(model.config)


def test_noted_edits_are_kept_in_order_and_written_into_the_record(monkeypatch):
    model = tiny()
    seen = []
    monkeypatch.setitem(REPLAYS, "prune", lambda m, params: seen.append(("prune", params)))
    monkeypatch.setitem(REPLAYS, "lora", lambda m, params: seen.append(("lora", params)))
    note_edit(model, "prune", {"modules": {"blocks.0.ffn": {"units": 8}}})
    note_edit(model, "lora", {"r": 4})
    record = record_of(model)
    assert [e["kind"] for e in record[EDITS_KEY]] == ["prune", "lora"]
    rebuilt = model_from_record(record)  # replayed in the same order, with the same params
    assert seen == [("prune", {"modules": {"blocks.0.ffn": {"units": 8}}}), ("lora", {"r": 4})]
    assert edits_of(rebuilt) == record[EDITS_KEY]


def test_edits_of_returns_a_copy():
    model = tiny()
    edits_of(model).append({"kind": "lora"})
    assert edits_of(model) == []


def test_an_unknown_edit_kind_is_refused_when_noted():
    with pytest.raises(ValueError, match="unknown model edit 'distil'"):
        note_edit(tiny(), "distil", {})


@pytest.mark.parametrize("edits, words", [
    ("prune", "must be a list"),
    ([{"kind": "distil"}], "does not know ('distil'"),
    ([["prune"]], "does not know (None"),
])
def test_malformed_edits_are_one_line(edits, words):
    with pytest.raises(ConfigError) as e:
        replay_edits(tiny(), edits, where="run/config.json")
    assert words in str(e.value) and "run/config.json" in str(e.value) and "\n" not in str(e.value)


def test_a_replay_that_does_not_fit_is_one_line_naming_the_record(monkeypatch):
    def replay(model, params):
        raise KeyError("blocks.9.attn")
    monkeypatch.setitem(REPLAYS, "prune", replay)
    with pytest.raises(ConfigError, match="run/config.json: the prune edit cannot be applied"):
        replay_edits(tiny(), [{"kind": "prune", "modules": {}}], where="run/config.json")

"""Hostile checkpoint records: config.json, progress.json and manifest.json replaced by random JSON,
edited in one place, cut off or filled with random bytes, with or without a manifest re-hashed to
vouch for the edit. `open_run` either opens the run or raises one of the tool's own errors in one
line; never another exception, and no file of the run is changed."""

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tformer.config import ConfigError
from tformer.models.gpt import GPT, GPTConfig
from tformer.models.record import model_record
from tformer.runs import CheckpointError, Run, checkpoint, memory, open_run
from tformer.runs.run import TOKENIZER_FILE
from tformer.tokenizers import CharTokenizer

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TOOL_ERRORS = (CheckpointError, ConfigError, ValueError, OSError)
RECORDS = (checkpoint.CONFIG, checkpoint.PROGRESS, checkpoint.MANIFEST)

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(),
                         st.text(max_size=6), st.sampled_from(["gpt", "bert", "vit", "../x", "sdpa"]))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6) | st.sampled_from(
        ["model_family", "model_config", "n_layers", "d_model", "vocab_size", "bytes", "sha256", "step",
         checkpoint.WEIGHTS, checkpoint.CONFIG]), inner, max_size=3)), max_leaves=10)


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A tiny trained-looking run: a GPT checkpoint and its character tokenizer."""
    root = tmp_path_factory.mktemp("template") / "run"
    config = GPTConfig(vocab_size=12, context_length=8, n_layers=1, n_heads=2, d_model=8)
    checkpoint.save(root / "checkpoints" / "best", GPT(config), progress={"step": 3, "best_val_loss": 1.5},
                    config={**model_record(config), "has_tokenizer": True})
    CharTokenizer(list("abcdefghijkl")).save(root / TOKENIZER_FILE)
    return root


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def rehash(folder: Path) -> None:
    """A manifest that vouches for whatever the record files now hold."""
    path = folder / checkpoint.MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except ValueError:
        return
    if isinstance(manifest, dict):
        for name in (checkpoint.CONFIG, checkpoint.PROGRESS):
            manifest[name] = {"bytes": (folder / name).stat().st_size,
                              "sha256": checkpoint.sha256_file(folder / name)}
        path.write_text(json.dumps(manifest))


def paths_of(data: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else []
    for key, value in items:
        out += paths_of(value, (*prefix, key))
    return out


def edited(data: Any, path: tuple, value: Any, delete: bool) -> Any:
    data = json.loads(json.dumps(data))
    if not path:
        return value
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return data


def check_open(template: Path, name: str, content: bytes, vouch: bool) -> None:
    """Replace one record of a copy of the template run and open it."""
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        shutil.copytree(template, run)
        folder = run / "checkpoints" / "best"
        (folder / name).write_bytes(content)
        if vouch and name != checkpoint.MANIFEST:
            rehash(folder)
        before = digest(run)
        # a record may describe a model of any size: keep the allocations of this test small
        with mock.patch.object(memory, "available_memory", return_value=256 << 20), \
                mock.patch.object(memory, "MAX_MODULES", 2_000):
            try:
                opened = open_run(run)
            except TOOL_ERRORS as e:
                assert str(e) and "\n" not in str(e), str(e)
            else:
                assert isinstance(opened, Run)
        assert digest(run) == before


@SETTINGS
@given(name=st.sampled_from(RECORDS), value=json_values, vouch=st.booleans())
def test_records_replaced_by_random_json(template, name, value, vouch):
    check_open(template, name, json.dumps(value).encode(), vouch)


@SETTINGS
@given(data=st.data(), name=st.sampled_from(RECORDS), value=json_values, delete=st.booleans(),
       vouch=st.booleans())
def test_records_edited_in_one_place(template, data, name, value, delete, vouch):
    original = json.loads((template / "checkpoints" / "best" / name).read_text())
    path = data.draw(st.sampled_from(paths_of(original)))
    check_open(template, name, json.dumps(edited(original, path, value, delete and bool(path))).encode(), vouch)


@SETTINGS
@given(name=st.sampled_from(RECORDS), cut=st.floats(0, 1), vouch=st.booleans())
def test_records_cut_off(template, name, cut, vouch):
    content = (template / "checkpoints" / "best" / name).read_bytes()
    check_open(template, name, content[: int(len(content) * cut)], vouch)


@SETTINGS
@given(name=st.sampled_from(RECORDS), content=st.binary(max_size=200), vouch=st.booleans())
def test_records_of_random_bytes(template, name, content, vouch):
    check_open(template, name, content, vouch)


@pytest.mark.parametrize("model_config", [
    {"n_layers": 10**12}, {"d_model": 2**40, "n_heads": 1}, {"vocab_size": 10**15},
])
def test_records_of_absurd_sizes_are_refused_quickly(template, model_config):
    record = json.loads((template / "checkpoints" / "best" / checkpoint.CONFIG).read_text())
    record["model_config"].update(model_config)
    check_open(template, checkpoint.CONFIG, json.dumps(record).encode(), vouch=True)


def test_the_template_opens(template):
    assert open_run(template).tokenizer.vocab_size == 12

"""Checkpoints: round trip, atomic replacement, corruption detected and never 'repaired' on disk."""

import errno
import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from tformer.models.gpt import GPT, GPTConfig
from tformer.runs import checkpoint
from tformer.runs.checkpoint import CheckpointError


def tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{"vocab_size": 40, "context_length": 16, "n_layers": 1, "n_heads": 2,
                                   "d_model": 16, **overrides}))


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def save_tiny(path, seed=0, step=1):
    model = tiny(seed)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    optimizer.step()
    state = {"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state()}
    checkpoint.save(path, model, progress={"step": step}, config={"note": "x"}, train_state=state)
    return model


def test_round_trip_restores_weights_ties_state_and_progress(tmp_path):
    model = save_tiny(tmp_path / "last", step=7)
    fresh = tiny(seed=1)
    ckpt = checkpoint.load(tmp_path / "last", fresh)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    assert fresh.lm_head.weight is fresh.tok_emb.weight
    assert ckpt.progress == {"step": 7} and ckpt.config == {"note": "x"}
    assert set(ckpt.train_state) == {"optimizer", "torch_rng"}


def test_saving_again_replaces_atomically_and_leaves_no_temporary_folders(tmp_path):
    save_tiny(tmp_path / "last", step=1)
    save_tiny(tmp_path / "last", seed=3, step=2)
    assert checkpoint.load_progress(tmp_path / "last") == {"step": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["last"]


def test_a_crash_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    save_tiny(tmp_path / "last", step=1)
    before = tree_digest(tmp_path / "last")

    def crash(path, data):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "_write_json", crash)
    with pytest.raises(OSError, match="disk full"):
        save_tiny(tmp_path / "last", seed=5, step=2)
    assert tree_digest(tmp_path / "last") == before
    assert [p.name for p in tmp_path.iterdir()] == ["last"]


def test_a_crash_between_the_renames_is_recovered(tmp_path):
    save_tiny(tmp_path / "last", step=3)
    dead_pid = 4_194_305  # above Linux's largest pid_max: the process that wrote it is gone
    (tmp_path / "last").rename(tmp_path / f".old-last-{dead_pid}-deadbeef")  # killed between renames
    assert checkpoint.resolve(tmp_path / "last") == tmp_path / "last"
    assert checkpoint.load_progress(tmp_path / "last") == {"step": 3}
    assert checkpoint.resolve(tmp_path / "nothing") is None


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "delete_manifest"])
def test_damaged_checkpoints_are_refused_and_left_as_they_are(tmp_path, damage):
    save_tiny(tmp_path / "last")
    weights = tmp_path / "last" / checkpoint.WEIGHTS
    data = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "flip_byte":
        weights.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    else:
        (tmp_path / "last" / checkpoint.MANIFEST).unlink()
    before = tree_digest(tmp_path)
    expected = {"truncate": "truncated", "flip_byte": "checksum", "delete_manifest": "not a complete"}
    with pytest.raises(CheckpointError, match=expected[damage]):
        checkpoint.load(tmp_path / "last", tiny())
    assert tree_digest(tmp_path) == before


def test_weights_of_another_config_are_refused_clearly(tmp_path):
    save_tiny(tmp_path / "last")
    with pytest.raises(CheckpointError, match="does not fit this model"):
        checkpoint.load(tmp_path / "last", tiny(d_model=32))


def test_train_state_is_loaded_without_unpickling_code(tmp_path, monkeypatch):
    save_tiny(tmp_path / "last")
    calls = []
    original = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or original(*a, **k))
    checkpoint.load(tmp_path / "last", tiny())
    assert calls and all(k.get("weights_only") is True for k in calls)


# --- issue 11: every bad checkpoint is one CheckpointError line; a full disk keeps the old one ----

def rewrite_manifest(folder: Path) -> None:
    """Re-hash the files as if a tool had edited them consistently (the manifest then vouches)."""
    files = sorted(p.name for p in folder.iterdir() if p.name != checkpoint.MANIFEST)
    entries = {n: {"bytes": (folder / n).stat().st_size, "sha256": checkpoint.sha256_file(folder / n)}
               for n in files}
    (folder / checkpoint.MANIFEST).write_text(json.dumps(entries))


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and message, message
    return message


def edit_weights(folder: Path, change) -> None:
    from safetensors.torch import load_file, save_file
    tensors = load_file(folder / checkpoint.WEIGHTS)
    save_file(change(dict(tensors)), folder / checkpoint.WEIGHTS)
    rewrite_manifest(folder)


@pytest.mark.parametrize("change, expected", [
    (lambda t: {**t, "extra.weight": torch.zeros(3)}, "1 unexpected (extra.weight)"),
    (lambda t: {k: v for k, v in t.items() if k != "lm_head.bias" and k != max(t)}, "missing"),
])
def test_missing_or_extra_tensors_are_one_line_naming_them(tmp_path, change, expected):
    save_tiny(tmp_path / "last")
    edit_weights(tmp_path / "last", change)
    with pytest.raises(CheckpointError, match="does not fit this model") as error:
        checkpoint.load(tmp_path / "last", tiny())
    assert expected in one_line(error)


@pytest.mark.parametrize("failure", [
    OSError(errno.ENOSPC, "No space left on device"),
    SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No '
                    'space left on device" })'),
])
def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, failure):
    save_tiny(tmp_path / "last", step=1)
    before = tree_digest(tmp_path / "last")

    def full(*args, **kwargs):
        raise failure

    monkeypatch.setattr(checkpoint, "save_model", full)
    with pytest.raises((OSError, CheckpointError), match="no space left on device") as error:
        save_tiny(tmp_path / "last", seed=5, step=2)
    assert str(tmp_path / "last") in one_line(error) and "kept" in str(error.value)
    assert tree_digest(tmp_path / "last") == before
    assert [p.name for p in tmp_path.iterdir()] == ["last"]


def test_torch_save_failing_to_write_is_one_line(tmp_path, monkeypatch):
    save_tiny(tmp_path / "last", step=1)
    before = tree_digest(tmp_path / "last")

    def failed(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed "
                           "writing file data/0: file write failed")

    monkeypatch.setattr(checkpoint.torch, "save", failed)
    with pytest.raises(CheckpointError, match="file write failed .*MiB free") as error:
        save_tiny(tmp_path / "last", seed=5, step=2)
    one_line(error)
    assert tree_digest(tmp_path / "last") == before


class Payload:
    """Anything that is not a tensor or plain data: weights_only refuses to build it."""

    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_pickled_train_state_is_refused_in_one_line_and_never_run(tmp_path, capsys):
    model = save_tiny(tmp_path / "last")
    torch.save({"optimizer": Payload()}, tmp_path / "last" / checkpoint.STATE)
    rewrite_manifest(tmp_path / "last")
    with pytest.raises(CheckpointError, match="train_state.pt holds something other than tensors and "
                                              "plain data, so it was not loaded") as error:
        checkpoint.load(tmp_path / "last", model)
    one_line(error)
    assert "must never run" not in capsys.readouterr().out


@pytest.mark.parametrize("name, content", [
    (checkpoint.CONFIG, "[1, 2]"), (checkpoint.CONFIG, '"gpt"'), (checkpoint.CONFIG, "null"),
    (checkpoint.PROGRESS, "[]"), (checkpoint.PROGRESS, "7"),
])
def test_config_and_progress_must_be_json_objects(tmp_path, name, content):
    save_tiny(tmp_path / "last")
    (tmp_path / "last" / name).write_text(content)
    rewrite_manifest(tmp_path / "last")
    with pytest.raises(CheckpointError, match=f"{name} must hold a JSON object") as error:
        checkpoint.load(tmp_path / "last", tiny())
    one_line(error)


def edit_manifest(folder: Path, change) -> None:
    path = folder / checkpoint.MANIFEST
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


@pytest.mark.parametrize("change, expected", [
    (lambda m: [m], "must hold a JSON object"),
    (lambda m: {**m, checkpoint.CONFIG: "abc"}, "the entry of config.json must be"),
    (lambda m: {**m, checkpoint.CONFIG: {"bytes": "12", "sha256": m[checkpoint.CONFIG]["sha256"]}},
     "the entry of config.json must be"),
    (lambda m: {**m, checkpoint.CONFIG: {"bytes": True, "sha256": m[checkpoint.CONFIG]["sha256"]}},
     "the entry of config.json must be"),
    (lambda m: {**m, "../x": {"bytes": 1, "sha256": "0" * 64}}, "'../x', which is not a file of this folder"),
    (lambda m: {**m, "/etc/passwd": {"bytes": 1, "sha256": "0" * 64}}, "not a file of this folder"),
    (lambda m: {}, "does not list model.safetensors, config.json, progress.json, train_state.pt"),
    (lambda m: {k: v for k, v in m.items() if k != checkpoint.STATE}, "does not list train_state.pt"),
])
def test_malformed_or_empty_manifests_are_refused(tmp_path, change, expected):
    save_tiny(tmp_path / "last")
    edit_manifest(tmp_path / "last", change)
    before = tree_digest(tmp_path)
    with pytest.raises(CheckpointError, match=re.escape(expected)) as error:
        checkpoint.load(tmp_path / "last", tiny())
    one_line(error)
    assert tree_digest(tmp_path) == before


def test_an_empty_manifest_no_longer_vouches_for_edited_files(tmp_path):
    save_tiny(tmp_path / "last")
    (tmp_path / "last" / checkpoint.CONFIG).write_text('{"note": "edited"}')
    edit_manifest(tmp_path / "last", lambda m: {})
    with pytest.raises(CheckpointError, match="does not list"):
        checkpoint.load(tmp_path / "last", tiny())


@pytest.mark.parametrize("dtype", [torch.int32, torch.float64])
def test_weights_in_a_dtype_the_model_cannot_hold_exactly_are_refused(tmp_path, dtype):
    save_tiny(tmp_path / "last")
    edit_weights(tmp_path / "last", lambda t: {k: (v * 100).to(dtype) for k, v in t.items()})
    with pytest.raises(CheckpointError, match="the model holds F32: loading would change the weights") as e:
        checkpoint.load(tmp_path / "last", tiny())
    one_line(e)


def test_half_precision_weights_are_widened_exactly_with_a_warning(tmp_path, caplog):
    model = save_tiny(tmp_path / "last")
    edit_weights(tmp_path / "last", lambda t: {k: v.half() for k, v in t.items()})
    fresh = tiny(seed=1)
    checkpoint.load(tmp_path / "last", fresh)
    assert "widened exactly (F16->F32)" in caplog.text
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert b.dtype == torch.float32 and torch.equal(a.half().float(), b), name

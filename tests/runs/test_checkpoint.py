"""Checkpoints: round trip, atomic replacement, corruption detected and never 'repaired' on disk."""

import hashlib
from pathlib import Path

import pytest
import torch

from tformer.models.gpt import GPT, GPTConfig
from tformer.runs import checkpoint
from tformer.runs.checkpoint import CheckpointError


def tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**dict(vocab_size=40, context_length=16, n_layers=1, n_heads=2,
                                   d_model=16), **overrides}))


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
    (tmp_path / "last").rename(tmp_path / ".old-last-deadbeef")  # as if killed between renames
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

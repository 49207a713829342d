"""open_run refuses, in one line and before anything goes wrong later: a tokenizer with more tokens
than the model's vocabulary, a record that is not a model, a model too large for the memory."""

import json
import string
import time
from pathlib import Path

import pytest
import torch

from tformer.config import ConfigError
from tformer.models.record import model_record
from tformer.models.registry import build_model, get_config
from tformer.runs import CheckpointError, checkpoint, memory, open_run
from tformer.runs.run import TOKENIZER_FILE, token_vocabularies
from tformer.tokenizers import CharTokenizer


def make_run(root: Path, config, n_chars: int | None) -> Path:
    """A run directory holding `config`'s model and a character tokenizer of `n_chars` tokens."""
    torch.manual_seed(0)
    model = build_model(config)
    checkpoint.save(root / "checkpoints" / "best", model, progress={"step": 0},
                    config={**model_record(config), "has_tokenizer": n_chars is not None})
    if n_chars is not None:
        CharTokenizer([chr(0x4E00 + i) for i in range(n_chars)]).save(root / TOKENIZER_FILE)
    return root


def one_line(error: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(error.value), str(error.value)
    return str(error.value)


TINY_GPT = {"vocab_size": 40, "context_length": 16, "n_layers": 1, "n_heads": 2, "d_model": 16}


@pytest.mark.parametrize("name, overrides, tokens, field", [
    ("gpt", TINY_GPT, 41, "vocab_size=40"),
    ("nmt-tiny", {"vocab_size": 50, "tgt_vocab_size": 30, "share_embeddings": False, "tie_output": False,
                  "d_model": 16, "n_heads": 2, "n_encoder_layers": 1, "n_decoder_layers": 1},
     40, "target_vocab_size=30"),
    ("seed-sketch", {"condition": "text", "condition_vocab": 12, "condition_length": 4, "d_model": 16,
                     "n_heads": 2}, 13, "condition_vocab=12"),
])
def test_a_tokenizer_larger_than_the_models_vocabulary_is_refused_at_open(tmp_path, name, overrides, tokens,
                                                                          field):
    run = make_run(tmp_path / "run", get_config(name, **overrides), tokens)
    expected = f"has {tokens} tokens but the model's vocabulary has {field}"
    with pytest.raises(CheckpointError, match=expected) as e:
        open_run(run)
    assert str(run / TOKENIZER_FILE) in one_line(e)


@pytest.mark.parametrize("name, overrides, tokens", [
    ("gpt", TINY_GPT, 40),                                     # exactly the vocabulary
    ("gpt", TINY_GPT, 12),                                     # fewer: some embeddings unused
    ("seed-sketch", {"d_model": 16, "n_heads": 2}, 500),         # label conditions read no tokens
    ("vit-digits", {"d_model": 16, "n_heads": 2, "n_layers": 1}, 500),  # no vocabulary at all
])
def test_tokenizers_that_fit_or_are_not_read_open(tmp_path, name, overrides, tokens):
    run = open_run(make_run(tmp_path / "run", get_config(name, **overrides), tokens))
    assert run.tokenizer.vocab_size == tokens


def test_token_vocabularies_by_family():
    assert token_vocabularies(get_config("gpt-nano")) == {"vocab_size": get_config("gpt-nano").vocab_size}
    assert token_vocabularies(get_config("vit-digits")) == {}
    assert token_vocabularies(get_config("nmt-tiny")) == {"vocab_size": 4000, "target_vocab_size": 4000}


def test_a_model_too_large_for_the_memory_is_refused_before_allocating(tmp_path, monkeypatch):
    run = make_run(tmp_path / "run", get_config("gpt", **TINY_GPT), 20)
    config_path = run / "checkpoints" / "best" / checkpoint.CONFIG
    record = json.loads(config_path.read_text())
    record["model_config"].update(n_layers=400, d_model=16384, n_heads=16)  # ~1.3e12 parameters
    config_path.write_text(json.dumps(record))
    manifest = json.loads((config_path.parent / checkpoint.MANIFEST).read_text())
    manifest[checkpoint.CONFIG] = {"bytes": config_path.stat().st_size,
                                   "sha256": checkpoint.sha256_file(config_path)}
    (config_path.parent / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    monkeypatch.setattr(memory, "available_memory", lambda: 64 << 30)
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=r"1,288,.* parameters\) needs 4\.[0-9] TiB of memory, but "
                                              r"64\.0 GiB is available") as e:
        open_run(run)
    one_line(e)
    assert time.perf_counter() - start < 60  # measured on the meta device, nothing allocated


def test_check_fits_counts_exactly_and_scales_with_copies():
    config = get_config("gpt", **TINY_GPT)
    model = build_model(config)
    params, size = memory.model_bytes(config)
    assert params == sum(p.numel() for p in model.parameters())
    assert size == sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert memory.check_fits(config, available=size) == size
    with pytest.raises(ConfigError, match="x 4"):
        memory.check_fits(config, copies=4, available=4 * size - 1)


def test_an_absurd_depth_is_refused_without_building_it(monkeypatch):
    monkeypatch.setattr(memory, "MAX_MODULES", 500)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="more than 500 modules .* use fewer layers"):
        memory.check_fits(get_config("gpt", **{**TINY_GPT, "n_layers": 10**9}))
    assert time.perf_counter() - start < 10


def test_available_memory_reads_the_machine():
    free = memory.available_memory()
    assert free is None or free > 0


@pytest.mark.parametrize("record", [
    {"model_family": ["gpt"], "model_config": {}},
    {"model_family": "gpt", "model_config": []},
    {"model_family": "gpt", "model_config": {"n_layers": "two"}},
    {"model_family": "gpt", "model_config": {"n_layers": [1]}},
    {"model_family": "gpt", "model_config": {"dropout": {"p": 1}}},
    {"model_family": "gpt", "model_config": {"d_model": 1e400}},
])
def test_records_that_are_not_a_model_are_one_line(tmp_path, record):
    run = make_run(tmp_path / "run", get_config("gpt", **TINY_GPT), 20)
    folder = run / "checkpoints" / "best"
    (folder / checkpoint.CONFIG).write_text(json.dumps(record))
    manifest = json.loads((folder / checkpoint.MANIFEST).read_text())
    manifest[checkpoint.CONFIG] = {"bytes": (folder / checkpoint.CONFIG).stat().st_size,
                                   "sha256": checkpoint.sha256_file(folder / checkpoint.CONFIG)}
    (folder / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="config.json") as e:
        open_run(run)
    one_line(e)


def test_a_tokenizer_of_letters_opens_with_its_model(tmp_path):
    config = get_config("gpt", **{**TINY_GPT, "vocab_size": len(string.ascii_letters)})
    run = make_run(tmp_path / "run", config, None)
    CharTokenizer(list(string.ascii_letters)).save(run / TOKENIZER_FILE)
    assert open_run(run).tokenizer.encode("aB") == [0, 27]

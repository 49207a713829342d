"""compress.output: the one writer of edited runs (pruned, quantized, merged, re-attached) keeps the
source's run keys and step, names the resolved source checkpoint, writes summary.json in the same
atomic step and leaves `out` as it was on any failure; the output folder check is one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tformer.compress import output
from tformer.compress.output import RECORD_KEYS, SOURCE_KEY, check_new_folder, write_run
from tformer.runs import checkpoint, open_run

pytestmark = pytest.mark.usefixtures("one_thread")
GPT = "gpt-shakespeare-char"


def test_the_writer_keeps_the_source_keys_and_step(trained: dict, tmp_path: Path) -> None:
    source = open_run(trained[GPT])
    source.record["init_from"] = "runs/elsewhere"  # a fine-tuned run's key: must survive like any other
    out = write_run(source.model, source, tmp_path / "out", summary={"what": "nothing"}, extra_keys={"note": 1})
    written = open_run(out)
    kept = {k: v for k, v in source.record.items() if k not in RECORD_KEYS}
    assert {k: written.record[k] for k in kept} == kept and {"data_sha256", "recipe", "training"} <= set(kept)
    assert written.record["note"] == 1
    assert written.record[SOURCE_KEY] == str(source.checkpoint.resolve())
    assert checkpoint.load_progress(written.checkpoint)["step"] == checkpoint.load_progress(source.checkpoint)["step"]
    assert json.loads((out / output.SUMMARY_FILE).read_text()) == {"what": "nothing"}
    assert (out / "tokenizer.json").read_bytes() == (trained[GPT] / "tokenizer.json").read_bytes()
    ids = torch.randint(0, source.model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(written.model(ids), source.model(ids))
    with pytest.raises(ValueError, match="compressed_from is written from the model and the source"):
        write_run(source.model, source, tmp_path / "other", extra_keys={SOURCE_KEY: "x"})
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("existing", [False, True])
def test_a_failed_write_leaves_nothing(trained: dict, tmp_path: Path, monkeypatch, existing: bool) -> None:
    source = open_run(trained[GPT])
    out = tmp_path / "out"
    if existing:
        out.mkdir()  # an empty folder given by the user stays, empty

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(output.rundir, "write_marker", fail)  # the last step inside the atomic folder
    with pytest.raises(OSError, match="disk full"):
        write_run(source.model, source, out, summary={"a": 1})
    assert out.is_dir() == existing and (not existing or not any(out.iterdir()))
    assert [p.name for p in tmp_path.iterdir()] == (["out"] if existing else [])  # no staging folder left


def test_the_output_folder_is_new_or_empty(tmp_path: Path, one_line_error) -> None:
    assert check_new_folder(tmp_path / "new") == tmp_path / "new" and not (tmp_path / "new").exists()
    assert check_new_folder(tmp_path) == tmp_path  # empty
    (tmp_path / "file").write_text("x")
    assert "is a file" in one_line_error(lambda: check_new_folder(tmp_path / "file"))
    assert "is not empty" in one_line_error(lambda: check_new_folder(tmp_path))
    assert (tmp_path / "file").read_text() == "x"

"""`tformer quantize` on the session's tiny GPT: it writes a run that opens with its int8 layers,
summary.json says what was quantized and the sizes, and bad input is one line (exit 2) with
nothing written."""

from __future__ import annotations

import json

import pytest

from tformer.cli import main
from tformer.nn.quantized import WEIGHT_ONLY, QuantizedLinear
from tformer.runs import open_run

pytestmark = pytest.mark.usefixtures("one_thread")
GPT = "gpt-shakespeare-char"


def test_quantize_writes_a_run_and_summary(trained, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(trained[GPT]), "--out", str(out), "--scheme", "int8-weight"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scheme"] == WEIGHT_ONLY and "lm_head" in summary["modules"]
    assert f"quantized {len(summary['modules'])} linear layers to {WEIGHT_ONLY}" in printed
    assert "size" in printed and summary["bytes_before"] > 0 and summary["bytes_after"] > 0
    run = open_run(out)
    assert sum(isinstance(m, QuantizedLinear) for m in run.model.modules()) == len(summary["modules"])
    assert (out / "tokenizer.json").read_bytes() == (trained[GPT] / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("args, message", [
    (["--scheme", "int4"], "invalid choice"),
    (["--skip", "*"], "no linear layer"),
    (["--skip", "lm_head", "nomatch"], "'nomatch' matches no linear layer"),
])
def test_bad_input_is_one_line(trained, tmp_path, capsys, args, message):
    out = tmp_path / "q"
    assert main(["quantize", str(trained[GPT]), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) <= 2  # argparse: usage line + error line
    assert not out.exists()


def test_non_empty_out_is_refused(trained, tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("x")
    assert main(["quantize", str(trained[GPT]), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "not empty" in err and "\n" not in err
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]


def test_a_lora_run_is_refused(trained, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(trained["bert-sentiment-minilm-lora"]), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error:") and "merge the adapters first: tformer adapter RUN --merge --out DIR" in err
    assert not out.exists()

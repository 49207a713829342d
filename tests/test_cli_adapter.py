"""`tformer adapter`: --merge, --save (tformer's and peft's format) and --load write new folders
that open as runs with the LoRA run's outputs; bad input is one `error:` line, nothing overwritten."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from tformer.cli import main
from tformer.nn.lora import lora_layers
from tformer.runs import open_run

pytestmark = pytest.mark.usefixtures("one_thread")

RUN = "bert-sentiment-minilm-lora"
IDS = torch.tensor([[2, 5, 7, 9, 3, 0], [2, 8, 4, 3, 0, 0]])


def encoded(path: Path) -> torch.Tensor:
    with torch.no_grad():
        return open_run(path).model.encode(IDS, attention_mask=(IDS != 0).long())


def test_merge_save_and_load(trained: dict, tmp_path: Path, capsys) -> None:
    lora_run = trained[RUN]
    assert main(["adapter", str(lora_run), "--merge", "--out", str(tmp_path / "merged")]) == 0
    assert not lora_layers(open_run(tmp_path / "merged").model)
    assert (encoded(tmp_path / "merged") - encoded(lora_run)).abs().max() <= 1e-5
    assert main(["adapter", str(lora_run), "--save", "--out", str(tmp_path / "adapters")]) == 0
    assert main(["adapter", str(trained["bert-mlm-shakespeare"]), "--load", str(tmp_path / "adapters"),
                 "--out", str(tmp_path / "again")]) == 0
    assert torch.equal(encoded(tmp_path / "again"), encoded(lora_run))
    # peft's format: a mean-pooling classifier has no transformers twin, so only the encoder's adapters
    assert main(["adapter", str(lora_run), "--save", "--peft", "--out", str(tmp_path / "peft")]) == 0
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["auto_mapping"]["base_model_class"] == "BertModel" and config["modules_to_save"] is None
    assert main(["adapter", str(trained["bert-mlm-shakespeare"]), "--load", str(tmp_path / "peft"),
                 "--out", str(tmp_path / "from-peft")]) == 0
    assert (encoded(tmp_path / "from-peft") - encoded(lora_run)).abs().max() <= 1e-6
    assert "wrote" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["{lora}", "--merge", "--peft", "--out", "{new}"], "--peft goes with --save"),
    (["{lora}", "--save", "--out", "{full}"], "is not empty"),
    (["{plain}", "--merge", "--out", "{new}"], "has no LoRA adapters"),
    (["{vit}", "--save", "--peft", "--out", "{new}"], "has no LoRA adapters"),
    (["{plain}", "--load", "{full}", "--out", "{new}"], "holds no peft adapters"),
    (["{missing}", "--merge", "--out", "{new}"], "does not exist"),
    (["{plain}", "--load", "{missing}", "--out", "{new}"], "--load .*nowhere does not exist"),
])
def test_bad_input_is_one_line(args: list, message: str, trained: dict, tmp_path: Path, capsys) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    names = {"lora": trained[RUN], "plain": trained["bert-sentiment"], "vit": trained["vit-mnist"],
             "full": tmp_path / "full", "new": tmp_path / "new", "missing": tmp_path / "nowhere"}
    assert main(["adapter", *[a.format(**names) for a in args]]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(message, err), err
    assert not (tmp_path / "new").exists() and (tmp_path / "full" / "notes.txt").read_text() == "mine"

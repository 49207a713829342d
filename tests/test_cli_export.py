"""`tformer export RUN --format hf` and `tformer import gpt2|bert|vit|llama`: a run exported and
imported again answers generate / predict / evaluate exactly as the original; what no Hugging Face
twin holds, folders with files and wrong checkpoints are one line (exit 2) with nothing written;
--format onnx hands the run to interop.onnx_export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from tformer.cli import main  # noqa: E402
from tformer.interop.huggingface import write_run  # noqa: E402
from tformer.models.bert import Bert, BertConfig  # noqa: E402
from tformer.models.gpt import GPT, GPTConfig  # noqa: E402
from tformer.runs import open_run  # noqa: E402
from tformer.tokenizers import CharTokenizer, load_tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def round_trip(run: Path, family: str, tmp_path: Path) -> Path:
    """RUN -> tformer export --format hf -> tformer import FAMILY -> a new run."""
    assert main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert main(["import", family, str(tmp_path / "hf"), str(tmp_path / "again")]) == 0
    return tmp_path / "again"


def answers(capsys, *args: str) -> str:
    capsys.readouterr()
    assert main(list(args)) == 0
    return capsys.readouterr().out


def same_weights(a: Path, b: Path) -> None:
    first, second = open_run(a).model.state_dict(), open_run(b).model.state_dict()
    assert first.keys() == second.keys()
    for name, tensor in first.items():
        assert torch.equal(tensor, second[name]), name


def test_char_gpt_generates_and_evaluates_the_same_after_gpt2_round_trip(trained, local_data, tmp_path, capsys):
    run = trained["gpt-shakespeare-char"]  # bias=False: exported with zero biases
    again = round_trip(run, "gpt2", tmp_path)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"] and (tmp_path / "hf" / "tokenizer.json").is_file()
    same_weights(run, again)
    generate = ["--prompt", "the king", "--max-new-tokens", "12", "--temperature", "0"]
    assert answers(capsys, "generate", str(again), *generate) == answers(capsys, "generate", str(run), *generate)
    (tmp_path / "text.txt").write_text(local_data["text"].read_text()[:400])
    text = ["--text", str(tmp_path / "text.txt")]
    scores = [[line for line in answers(capsys, "evaluate", str(r), *text).splitlines()
               if "loss" in line or "perplexity" in line] for r in (again, run)]  # not the step, the energy
    assert scores[0] == scores[1] and len(scores[0]) >= 2


def test_vit_predicts_the_same_after_round_trip(trained, seven_png, tmp_path, capsys):
    run = trained["vit-mnist"]
    again = round_trip(run, "vit", tmp_path)
    assert (tmp_path / "hf" / "preprocessor_config.json").is_file()
    same_weights(run, again)
    assert answers(capsys, "predict", str(again), str(seven_png)) == answers(capsys, "predict", str(run), str(seven_png))


def test_bert_classifier_predicts_the_same_after_round_trip(trained, tmp_path, capsys):
    tokenizer = load_tokenizer(trained["bert-mlm-shakespeare"] / "tokenizer.json")
    torch.manual_seed(0)
    model = Bert(BertConfig(vocab_size=tokenizer.vocab_size, context_length=32, n_layers=1, n_heads=2, d_model=16,
                            head="sequence", labels=("neg", "pos"))).eval()
    write_run(tmp_path / "run", model, tmp_path, tokenizer)
    again = round_trip(tmp_path / "run", "bert", tmp_path)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"] and config["label2id"] == {"neg": 0, "pos": 1}
    same_weights(tmp_path / "run", again)
    inputs = ["the king speaks", "a dull film", "--json"]
    assert answers(capsys, "predict", str(again), *inputs) == answers(capsys, "predict", str(tmp_path / "run"), *inputs)


def test_llama_style_gpt_generates_the_same_after_llama_round_trip(tmp_path, capsys):
    tokenizer = CharTokenizer.train("the king and queen speak of war\n", ["<|endoftext|>"])
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, context_length=32, n_layers=2, n_heads=4, n_kv_heads=2,
                          d_model=32, position="rope", norm="rmsnorm", activation="swiglu", bias=False)).eval()
    write_run(tmp_path / "run", model, tmp_path, tokenizer)
    again = round_trip(tmp_path / "run", "llama", tmp_path)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    same_weights(tmp_path / "run", again)
    generate = ["--prompt", "the ", "--max-new-tokens", "10", "--temperature", "0"]
    assert answers(capsys, "generate", str(again), *generate) == answers(capsys, "generate", str(tmp_path / "run"),
                                                                         *generate)


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory) -> Path:
    """An HF GPT-2 checkpoint folder (tokenizer.json included)."""
    from tformer.interop.hf_export import export_hf

    tokenizer = CharTokenizer.train("abc \n")
    return export_hf(GPT(GPTConfig(vocab_size=4, context_length=8, n_layers=1, n_heads=2, d_model=8)),
                     tmp_path_factory.mktemp("hf") / "gpt2", tokenizer)[0]


@pytest.mark.parametrize("args, message", [
    (["export", "{sentiment}", "--format", "hf", "--out", "{tmp}/out"], "as BERT it has pooling='mean'"),
    (["export", "{txl}", "--format", "hf", "--out", "{tmp}/out"], "a TransformerXL model has no Hugging Face twin"),
    (["export", "{gpt}", "--format", "hf", "--out", "{tmp}/mine"], "mine already holds files \\(notes.txt\\)"),
    (["export", "{gpt}", "--format", "tflite", "--out", "{tmp}/out"], "invalid choice: 'tflite'"),
    (["import", "llama", "{gpt}", "{tmp}/out"], "gpt-shakespeare-char/config.json not found"),
    (["import", "llama", "{hf_gpt2}", "{tmp}/out"], "model_type=.gpt2. .*only .llama."),
    (["import", "vit", "{tmp}/missing", "{tmp}/out"], "missing does not exist"),
    (["import", "gpt2", "{tmp}/mine", "{tmp}/out"], "config.json not found"),
])
def test_bad_input_is_one_line_and_writes_nothing(trained, hf_gpt2, tmp_path, capsys, args, message):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    names = {"sentiment": trained["bert-sentiment"], "txl": trained["transformer-xl-shakespeare"],
             "gpt": trained["gpt-shakespeare-char"], "hf_gpt2": hf_gpt2, "tmp": tmp_path}
    assert main([a.format(**names) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert __import__("re").search(message, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_onnx_format_hands_the_run_to_onnx_export(trained, tmp_path, capsys, monkeypatch):
    from tformer.interop import onnx_export

    calls = []
    monkeypatch.setattr(onnx_export, "export_onnx", lambda run, out, checkpoint: calls.append(
        (run, out, checkpoint)) or out)
    run = str(trained["vit-mnist"])
    assert main(["export", run, "--format", "onnx", "--out", str(tmp_path / "onnx"), "--checkpoint", "last"]) == 0
    assert calls == [(run, tmp_path / "onnx", "last")] and "exported to ONNX" in capsys.readouterr().out

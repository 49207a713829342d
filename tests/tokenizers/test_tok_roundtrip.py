"""Property: any Unicode text (surrogates excluded) round-trips encode -> decode exactly."""

from hypothesis import example, given, settings
from hypothesis import strategies as st

from tformer.tokenizers import BPETokenizer, CharTokenizer

ALPHABET = "abc xyz\n\té🤖\u0301\x00"
CHARS = CharTokenizer.train(ALPHABET, special_tokens=("<|endoftext|>",))


@settings(max_examples=300, deadline=None)
@given(text=st.text())
@example("")
@example("🤖👩‍👩‍👧 e\u0301 \x00 \U0010ffff\r\n")
@example("<|endoftext|><|endoftext|>")
@example(" " * 50 + "'s'll\n\n\n")
def test_bpe_round_trips_any_unicode(bpe: BPETokenizer, text: str) -> None:
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert bpe.encode_batch([text, text], num_threads=2) == [ids, ids]


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=ALPHABET))
def test_char_tokenizer_round_trips_its_alphabet(text: str) -> None:
    assert CHARS.decode(CHARS.encode(text)) == text


@settings(max_examples=100, deadline=None)
@given(text=st.text())
def test_hf_engine_round_trips_too(bpe: BPETokenizer, text: str) -> None:
    hf = BPETokenizer.from_dict(bpe.to_dict(), engine="hf")
    assert hf.decode(hf.encode(text)) == text

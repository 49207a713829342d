"""peft's adapter format: tformer LoRA models (GPT, BERT with a [CLS] classifier) written with
`write_peft`, loaded by peft itself onto a transformers model holding the same base weights, give
the same logits; read back, they give tformer's logits again; families without a twin and
malformed folders are one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from tformer.interop import hf_bert
from tformer.interop.huggingface import save_gpt2
from tformer.interop.peft import read_peft, write_peft
from tformer.models import build_model
from tformer.nn.lora import add_lora, lora_layers

pytestmark = pytest.mark.usefixtures("one_thread")


def randomise(model: torch.nn.Module, *, head: bool = False) -> None:
    """Nonzero B (and a head unlike its initialisation): a mis-mapped tensor cannot hide."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(0.2 * torch.randn(layer.lora_B.shape, generator=generator))
        for name, p in model.named_parameters():
            if head and name.startswith("head."):
                p.add_(0.1 * torch.randn(p.shape, generator=generator))


def lora_bert() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model("bert-tiny", vocab_size=50, n_layers=2, d_model=32, n_heads=4, d_ff=48, context_length=24,
                        head="sequence", labels=("neg", "pos"), pooling="cls", dropout=0.0, attn_dropout=0.0)
    with torch.no_grad():  # nonzero biases and norms
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    add_lora(model, r=4, alpha=8)
    randomise(model, head=True)
    return model.eval()


def hf_bert_twin(model: torch.nn.Module) -> torch.nn.Module:
    """BertForSequenceClassification from a config, holding the tformer model's base weights."""
    c = model.config
    hf = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
        intermediate_size=c.ffn_dim, max_position_embeddings=c.context_length, type_vocab_size=c.type_vocab_size,
        hidden_act="gelu", layer_norm_eps=c.norm_eps, num_labels=len(c.labels), hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0))
    ours = model.state_dict()
    state = {}
    names = {**hf_bert.tensor_names(c), **hf_bert.head_tensor_names(c)}
    for name, theirs in names.items():
        prefix = [] if theirs[0].startswith(("classifier", "cls.")) else ["bert."]
        for hf_name, part in zip(theirs, ours[name].chunk(len(theirs), dim=0)):  # fused qkv -> q, k, v rows
            state["".join(prefix) + hf_name] = part
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("position_ids" in n for n in missing), missing
    return hf.eval()


def test_bert_round_trip_through_peft(tmp_path: Path) -> None:
    model = lora_bert()
    write_peft(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert "bert.encoder.layer.0.attention.self.query" in config["target_modules"]
    assert config["modules_to_save"] == ["bert.pooler.dense", "classifier"]
    peft_model = peft.PeftModel.from_pretrained(hf_bert_twin(model), str(tmp_path / "adapter")).eval()
    ids = torch.randint(1, 50, (3, 10))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        ours = model(ids, attention_mask=mask)
        theirs = peft_model(input_ids=ids, attention_mask=mask).logits
        assert (ours - theirs).abs().max() <= 1e-4
        plain = hf_bert_twin(model)(input_ids=ids, attention_mask=mask).logits
        assert (ours - plain).abs().max() > 1e-3  # the adapters and the head do change the logits
    # read back onto a fresh model with the base weights: tformer's logits again
    torch.manual_seed(9)
    fresh = build_model("bert-tiny", **{k: getattr(model.config, k) for k in (
        "vocab_size", "n_layers", "d_model", "n_heads", "d_ff", "context_length", "head", "labels", "pooling")})
    base = {k: v for k, v in model.state_dict().items() if "lora_" not in k}
    fresh.load_state_dict(base)
    read_peft(tmp_path / "adapter", fresh)
    with torch.no_grad():
        assert (fresh.eval()(ids, attention_mask=mask) - ours).abs().max() <= 1e-6


def test_gpt2_round_trip_through_peft(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("gpt-nano", vocab_size=40, n_layers=2, d_model=32, n_heads=4, context_length=16,
                        dropout=0.0, activation="gelu_tanh", position="learned")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    save_gpt2(model, tmp_path / "gpt2")
    add_lora(model, ["qkv_proj", "ffn.up", "ffn.down"], r=2, alpha=4)
    randomise(model)
    write_peft(model.eval(), tmp_path / "adapter", base_model=str(tmp_path / "gpt2"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and "transformer.h.1.attn.c_attn" in config["target_modules"]
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "gpt2")).eval()
    peft_model = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    ids = torch.randint(0, 40, (2, 12))
    with torch.no_grad():
        ours = model(ids)
        assert (ours - peft_model(input_ids=ids).logits).abs().max() <= 1e-4
        fresh = build_model(model.config)
        fresh.load_state_dict(base)
        read_peft(tmp_path / "adapter", fresh)
        assert sorted(lora_layers(fresh)) == sorted(lora_layers(model))
        assert (fresh.eval()(ids) - ours).abs().max() <= 1e-6


def test_no_twin_and_bad_folders_are_one_line(tmp_path: Path, one_line_error) -> None:
    vit = build_model("vit-tiny-mnist", n_layers=1, d_model=16, n_heads=2, patch_size=4, d_ff=32)
    add_lora(vit, r=2)
    assert "no transformers twin" in one_line_error(lambda: write_peft(vit, tmp_path / "x"))
    plain = build_model("gpt-nano", vocab_size=40, n_layers=1, d_model=16, n_heads=2)
    assert "no LoRA adapters" in one_line_error(lambda: write_peft(plain, tmp_path / "y"))
    assert "holds no peft adapters" in one_line_error(lambda: read_peft(tmp_path, plain))
    model = lora_bert()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep")
    assert "new or empty folder" in one_line_error(lambda: write_peft(model, tmp_path / "full"))
    assert (tmp_path / "full" / "mine.txt").read_text() == "keep"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_peft(tmp_path / "nowhere", plain)


def test_pruned_or_quantized_models_are_refused(tmp_path: Path, one_line_error) -> None:
    from tformer.compress.prune import prune
    from tformer.compress.quantize import quantize

    pruned = build_model("bert-tiny", vocab_size=50, n_layers=2, d_model=32, n_heads=4, d_ff=48, context_length=24,
                         head="sequence", labels=("neg", "pos"), pooling="cls")
    prune(pruned, heads=0.5, importance="magnitude")
    add_lora(pruned, r=2)
    assert "edited by prune" in one_line_error(lambda: write_peft(pruned, tmp_path / "a"))
    quantized = build_model("gpt-nano", vocab_size=40, n_layers=1, d_model=16, n_heads=2)
    quantize(quantized, "auto")
    quantized.lm_head = torch.nn.Linear(16, 40, bias=False)  # a LoRA layer to write: wrap a float one
    add_lora(quantized, ["lm_head"], r=2)
    assert "edited by quantize" in one_line_error(lambda: write_peft(quantized, tmp_path / "b"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_adapters_that_do_not_fit_the_base_are_one_line(tmp_path: Path, one_line_error) -> None:
    write_peft(lora_bert(), tmp_path / "adapter")  # d_model 32, d_ff 48
    wider = build_model("bert-tiny", vocab_size=50, n_layers=2, d_model=48, n_heads=4, d_ff=64, context_length=24,
                        head="sequence", labels=("neg", "pos"), pooling="cls")
    message = one_line_error(lambda: read_peft(tmp_path / "adapter", wider))
    assert "needs A" in message and "give the base model the adapters were trained on" in message
    assert not lora_layers(wider)  # nothing was wrapped

"""Integrated gradients on the embedding layer: equal to captum's LayerIntegratedGradients (the
oracle) on GPT, a BERT classifier and ViT; complete (attributions sum to F(x) - F(baseline)) on
every family; chunking changes nothing but peak memory; bad input is one ValueError line."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from tformer.analysis.attribution import (Explained, blurred, conditional_token, each_output_token,
                                          find_embedding, image_class, integrated_gradients, next_token,
                                          quadrature, text_class, token_baseline)
from tformer.models import build_model

CLS, SEP, PAD, MASK = 2, 3, 0, 4  # special ids of the toy vocabularies below


def gpt():
    torch.manual_seed(0)
    return build_model("gpt-nano", vocab_size=50, context_length=16).eval()


def bert():
    torch.manual_seed(0)  # init_std 0.2: a random classifier whose logits differ across inputs
    return build_model("bert-tiny", vocab_size=60, context_length=16, head="sequence", labels=("neg", "pos"),
                       init_std=0.2).eval()


def vit():
    torch.manual_seed(0)
    return build_model("vit-digits", n_layers=2, init_std=0.2).eval()


def seq2seq():
    torch.manual_seed(0)
    return build_model("nmt-tiny", vocab_size=40, n_encoder_layers=1, n_decoder_layers=1, d_model=32,
                       dropout=0.0, activation="gelu").eval()


def image_gen():
    torch.manual_seed(0)
    return build_model("seed-sketch", height=3, width=4, palette=(0.0, 85.0, 170.0, 255.0),
                       labels=("a", "b", "c"), condition_vocab=3).eval()


def transformer_xl():
    torch.manual_seed(0)
    return build_model("transformer_xl", vocab_size=30, n_layers=2, n_heads=2, d_model=16, d_ff=32, seg_len=8,
                       mem_len=8, dropout=0.0).eval()


def sentences(rows: int = 2, length: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] words [SEP] ids (B, T) and a mask with the second row right-padded by 2."""
    torch.manual_seed(1)
    ids = torch.randint(5, 60, (rows, length))
    ids[:, 0], ids[:, -1] = CLS, SEP
    mask = torch.ones_like(ids)
    if rows > 1:
        ids[1, -3], ids[1, -2:], mask[1, -2:] = SEP, PAD, 0
    return ids, mask


def images(rows: int = 2) -> torch.Tensor:
    torch.manual_seed(2)
    return torch.rand(rows, 1, 8, 8)


def prompt(rows: int = 2, vocab: int = 50, length: int = 10) -> torch.Tensor:
    torch.manual_seed(3)
    return torch.randint(5, vocab, (rows, length))


# Each case: the explained scalar and a baseline; the oracle's forward function, layer and target
def case_gpt() -> tuple[Explained, torch.Tensor]:
    ids = prompt()
    return next_token(gpt(), ids, token=7), token_baseline(ids, PAD)


def case_bert() -> tuple[Explained, torch.Tensor]:
    ids, mask = sentences()
    return text_class(bert(), ids, mask, label="pos"), token_baseline(ids, MASK, keep=(CLS, SEP, PAD))


def case_vit() -> tuple[Explained, torch.Tensor]:
    x = images()
    return image_class(vit(), x, label=3), blurred(x, sigma=1.0)


def captum_oracle(explained: Explained, baseline: torch.Tensor, n_steps: int, method: str) -> torch.Tensor:
    """captum's LayerIntegratedGradients on the layer tformer found, with tformer's scalar."""
    captum_attr = pytest.importorskip("captum.attr")
    layer = find_embedding(explained).module
    lig = captum_attr.LayerIntegratedGradients(explained.score, layer)
    return lig.attribute(explained.inputs, baseline, n_steps=n_steps, method=method)


@pytest.mark.parametrize("case", [case_gpt, case_bert, case_vit], ids=["gpt", "bert", "vit"])
@pytest.mark.parametrize("method,n_steps", [("gausslegendre", 64), ("riemann_trapezoid", 20)])
def test_equals_captum_layer_integrated_gradients(case, method, n_steps):
    explained, baseline = case()
    ours = integrated_gradients(explained, baseline, n_steps=n_steps, method=method, steps_per_chunk=7)
    theirs = captum_oracle(explained, baseline, n_steps, method)
    assert ours.per_dim.shape == theirs.shape
    assert ours.per_dim.abs().max() > 1e-3  # not trivially zero
    torch.testing.assert_close(ours.per_dim, theirs.float(), atol=1e-5, rtol=0)


def test_the_embedding_layer_is_found_by_what_reads_the_input():
    """Token, patch, condition and (shared-table) target embeddings; never a family name."""
    ids, mask = sentences()
    b, lm = bert(), transformer_xl()
    assert find_embedding(text_class(b, ids, mask)).module is b.tok_emb
    assert find_embedding(next_token(lm, prompt(1, 30, 6))).module is lm.tok_emb
    v = vit()
    assert find_embedding(image_class(v, images())).module is v.patch_emb  # not its Conv2d, not the ViT
    s = seq2seq()
    src, prefix = prompt(1, 40, 7), torch.tensor([[1, 5, 6]])
    source_site = find_embedding(conditional_token(s, src, prefix))
    target_site = find_embedding(conditional_token(s, src, prefix, side="output"))
    assert source_site.module is target_site.module is s.src_emb  # one shared table...
    assert (source_site.call, target_site.call) == (0, 1)  # ...two calls: only the one asked for
    g = image_gen()
    cond, pixels = torch.tensor([[2]]), torch.tensor([[4, 0, 1, 2, 3, 1]])
    assert find_embedding(conditional_token(g, cond, pixels)).module is g.cond_emb
    assert find_embedding(conditional_token(g, cond, pixels, side="output")).module is g.pixel_emb


def every_family() -> dict[str, tuple[Explained, torch.Tensor | str]]:
    """One explained scalar per family, with a baseline of the kind a person would pick."""
    src, prefix = prompt(1, 40, 7), torch.tensor([[1, 5, 6]])
    cond, pixels = torch.tensor([[2]]), torch.tensor([[4, 0, 1, 2, 3, 1]])
    xl_ids = prompt(1, 30, 6)
    return {
        "gpt": case_gpt(), "bert": case_bert(), "vit": case_vit(),
        "vit-zeros": (case_vit()[0], "zeros"),
        "transformer_xl": (next_token(transformer_xl(), xl_ids), token_baseline(xl_ids, PAD)),
        "seq2seq-source": (conditional_token(seq2seq(), src, prefix), token_baseline(src, PAD)),
        "seq2seq-target": (conditional_token(seq2seq(), src, prefix, side="output"),
                           token_baseline(prefix, PAD, keep=(1,))),
        "image_gen-condition": (conditional_token(image_gen(), cond, pixels), "zeros"),
        "image_gen-pixels": (conditional_token(image_gen(), cond, pixels, side="output"), "zeros"),
    }


@pytest.mark.parametrize("name", list(every_family()))
def test_completeness_at_64_gauss_legendre_steps(name):
    """Attributions sum to F(x) - F(baseline): at n_steps=64, fp32, |gap| <= 1e-4 x max(1, |F(x) -
    F(baseline)|) (measured: 3e-8 .. 5e-5 absolute, the largest on the sharp BERT classifier)."""
    explained, baseline = every_family()[name]
    result = integrated_gradients(explained, baseline, n_steps=64)
    change = (result.score - result.baseline_score).abs()
    assert change.min() > 1e-3, "the test model's score must move between baseline and input"
    assert (result.gap.abs() <= 1e-4 * change.clamp(min=1.0)).all(), (result.gap, change)
    torch.testing.assert_close(result.per_position, result.per_dim.sum(-1))
    assert result.per_position.shape == result.per_dim.shape[:2] and result.target == explained.target


def test_the_gap_exposes_a_baseline_the_path_cannot_reach_smoothly():
    """A zero embedding in a post-norm model without absolute positions (Transformer-XL) is
    LayerNorm(0): the score jumps as the path leaves it, no quadrature can integrate the jump,
    and the reported gap says so instead of hiding it."""
    explained = next_token(transformer_xl(), prompt(1, 30, 6))
    gaps = [integrated_gradients(explained, "zeros", n_steps=n).gap.abs().item() for n in (16, 64)]
    assert min(gaps) > 0.1


@pytest.mark.parametrize("steps_per_chunk", [1, 5, 64])
def test_chunked_equals_unchunked(steps_per_chunk):
    explained, baseline = case_bert()
    whole = integrated_gradients(explained, baseline, n_steps=64, steps_per_chunk=64)
    chunked = integrated_gradients(explained, baseline, n_steps=64, steps_per_chunk=steps_per_chunk)
    torch.testing.assert_close(chunked.per_dim, whole.per_dim, atol=1e-6, rtol=0)
    budgeted = integrated_gradients(explained, baseline, n_steps=64, memory_budget=1)  # one step a chunk
    torch.testing.assert_close(budgeted.per_dim, whole.per_dim, atol=1e-6, rtol=0)


MEASURE = textwrap.dedent("""
    import resource, sys, torch
    from tformer.models import build_model
    from tformer.analysis.attribution import integrated_gradients, next_token, token_baseline
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = build_model("gpt-micro", vocab_size=256).eval()
    ids = torch.randint(1, 256, (1, 128))
    explained, baseline = next_token(model, ids), token_baseline(ids, 0)
    integrated_gradients(explained, baseline, n_steps=2, steps_per_chunk=1)  # allocator warm-up
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    integrated_gradients(explained, baseline, n_steps=int(sys.argv[1]), steps_per_chunk=8)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)  # MiB (Linux: KiB)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KiB is Linux's")
def test_peak_memory_does_not_grow_with_steps():
    """In a fresh process each: the peak grows by about one chunk's activations (~12 MiB here at
    8 steps a chunk), whatever n_steps is; unchunked, 256 steps would hold 256 points' worth."""
    growth = {n: float(subprocess.run([sys.executable, "-c", MEASURE, str(n)], capture_output=True, text=True,
                                      check=True).stdout) for n in (32, 256)}
    assert growth[256] < growth[32] + 32, growth


def test_bad_input_is_one_line(one_line_error):
    ids, mask = sentences()
    b, g = bert(), gpt()
    explained = text_class(b, ids, mask)
    assert "not one of the model's 2 classes" in one_line_error(lambda: text_class(b, ids, mask, label=2))
    assert "not one of" in one_line_error(lambda: text_class(b, ids, mask, label="neutral"))
    assert "not one of" in one_line_error(lambda: image_class(vit(), images(), label=10))
    assert "at most 16 positions" in one_line_error(lambda: text_class(b, prompt(1, 60, 17)))
    assert "at most 16 positions" in one_line_error(lambda: next_token(g, prompt(1, 50, 17)))
    assert "vocabulary" in one_line_error(lambda: next_token(g, prompt(), token=50))
    assert "n_steps" in one_line_error(lambda: integrated_gradients(explained, "zeros", n_steps=0))
    assert "n_steps" in one_line_error(lambda: quadrature(1, "riemann_trapezoid"))
    assert "shaped like the input" in one_line_error(
        lambda: integrated_gradients(explained, torch.zeros(2, 8, dtype=torch.long)))
    assert "shaped like the input" in one_line_error(
        lambda: integrated_gradients(image_class(vit(), images()), images(1)))
    assert "method" in one_line_error(lambda: integrated_gradients(explained, n_steps=4, method="simpson"))
    assert "capability" in one_line_error(lambda: text_class(g, ids))
    start = image_gen().config.bos_id  # the image generator's start token is never drawn: p = 0
    assert "can never come next" in one_line_error(
        lambda: conditional_token(image_gen(), torch.tensor([[2]]), torch.tensor([[start, 0, 1]]), token=start))


def test_each_output_token_equals_one_conditional_token_per_position(one_line_error):
    """A translation's every token in one batch: row t equals integrated gradients of log p(token t |
    source, decoder input[:t + 1]) alone, and the teacher-forced batch reads nothing after t."""
    s, src = seq2seq(), prompt(1, 40, 7)
    decoder_input, tokens = torch.tensor([[1, 5, 6, 9]]), torch.tensor([5, 6, 9, 2])
    together = integrated_gradients(each_output_token(s, src, decoder_input, tokens), "zeros", n_steps=16)
    assert together.per_position.shape == (4, 7) and together.target == (5, 6, 9, 2)
    for t in range(4):
        alone = integrated_gradients(conditional_token(s, src, decoder_input[:, :t + 1], token=int(tokens[t]),
                                                       position=t), "zeros", n_steps=16)
        torch.testing.assert_close(together.per_position[t], alone.per_position[0], atol=1e-5, rtol=1e-4)
    assert "(1, L)" in one_line_error(lambda: each_output_token(s, src, decoder_input, tokens[:3]))


def test_training_mode_is_restored_and_dropout_is_off():
    b = bert()
    b.train()
    explained, baseline = case_bert()
    explained = text_class(b, explained.inputs, None, label=1)
    first = integrated_gradients(explained, baseline, n_steps=8)
    assert b.training
    torch.testing.assert_close(integrated_gradients(explained, baseline, n_steps=8).per_dim, first.per_dim)


def test_blur_keeps_flat_images_and_removes_edges():
    flat = torch.full((1, 3, 8, 8), 0.3)
    torch.testing.assert_close(blurred(flat), flat)
    edge = torch.zeros(1, 1, 8, 8)
    edge[..., 4:] = 1.0
    smooth = blurred(edge, sigma=1.0)
    assert smooth.shape == edge.shape and 0 < smooth[0, 0, 0, 3] < 0.5 < smooth[0, 0, 0, 4] < 1

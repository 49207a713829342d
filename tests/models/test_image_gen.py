"""The image generator: cached decoding equals the teacher-forced forward, classifier-free
guidance equals its definition, sampling is reproducible and stays in the palette, a tiny model
learns class-specific images, and bad conditions / settings fail clearly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tformer.config import ConfigError
from tformer.inference import Sampling
from tformer.inference.images import condition_ids, sample_images, sample_tokens, save_image_grid
from tformer.models import build_model, get_config
from tformer.models.image_gen import ImageGenConfig, ImageGenerator
from tformer.tokenizers import CharTokenizer

GREYS = tuple(float(v) for v in np.linspace(0, 255, 5))


def tiny(condition: str = "label", **overrides) -> ImageGenerator:
    torch.manual_seed(0)
    values = dict(height=3, width=4, palette=GREYS, condition=condition, labels=("a", "b", "c"),
                  condition_vocab=3, condition_length=1, d_model=32, n_heads=4)
    if condition == "text":
        values.update(labels=("a", "b", "c"), condition_vocab=7, condition_length=6)
    return ImageGenerator(ImageGenConfig(**{**values, **overrides})).eval()


def incremental_logits(model: ImageGenerator, cond: torch.Tensor, mask: torch.Tensor | None,
                       tokens: torch.Tensor, guidance: float = 1.0) -> torch.Tensor:
    """Logits of every pixel from the bound decoder, one token at a time through its cache."""
    decoder = model.bind(cond, mask, guidance)
    cache = decoder.new_cache(len(cond))
    inputs = torch.cat([torch.full_like(tokens[:, :1], model.config.bos_id), tokens[:, :-1]], 1)
    return torch.cat([decoder(inputs[:, t:t + 1], cache=cache) for t in range(inputs.shape[1])], 1)


@pytest.mark.parametrize("condition", ["label", "text"])
def test_cached_decoding_matches_forward(condition: str) -> None:
    model = tiny(condition)
    if condition == "label":
        cond, mask = torch.tensor([[1], [3]]), None
    else:  # right-padded prompts of different lengths
        cond = torch.tensor([[1, 2, 3, 4, 5, 6], [7, 2, 0, 0, 0, 0]])
        mask = cond != 0
    tokens = torch.randint(0, 5, (2, 12))
    with torch.no_grad():
        full = model(cond, tokens, cond_mask=mask)
        step = incremental_logits(model, cond, mask, tokens)
    assert (step[..., :5] - full).abs().max() < 1e-5
    assert torch.isinf(step[..., 5]).all()  # <bos> is never sampled


def test_padding_of_the_condition_is_ignored() -> None:
    model = tiny("text")
    short = torch.tensor([[3, 1]])
    padded = torch.tensor([[3, 1, 0, 0]])
    tokens = torch.randint(0, 5, (1, 12))
    with torch.no_grad():
        a = model(short, tokens)
        b = model(padded, tokens, cond_mask=padded != 0)
    assert (a - b).abs().max() < 1e-5


@pytest.mark.parametrize("scale", [0.0, 1.0, 2.5])
def test_guidance_mixes_conditional_and_null_log_probs(scale: float) -> None:
    model = tiny()
    cond, tokens = torch.tensor([[2], [3]]), torch.randint(0, 5, (2, 12))
    with torch.no_grad():
        guided = incremental_logits(model, cond, None, tokens, scale)[..., :5]
        conditional = F.log_softmax(model(cond, tokens), -1)
        null = F.log_softmax(model(torch.zeros_like(cond), tokens), -1)
    expected = null + scale * (conditional - null)
    assert (F.log_softmax(guided, -1) - F.log_softmax(expected, -1)).abs().max() < 1e-4


def test_sampling_is_seeded_and_stays_in_the_palette() -> None:
    model = tiny()
    cond = torch.tensor([[1], [2], [3]])
    a = sample_tokens(model, cond, sampling=Sampling(1.0), guidance_scale=2.0, seed=3)
    b = sample_tokens(model, cond, sampling=Sampling(1.0), guidance_scale=2.0, seed=3)
    assert a.shape == (3, 12) and torch.equal(a, b)
    assert 0 <= int(a.min()) and int(a.max()) < 5
    images = sample_images(model, ["a", 2], per_condition=2, seed=0)
    assert images.shape == (4, 3, 4, 1) and images.dtype == np.uint8
    assert set(np.unique(images)) <= {round(v) for v in GREYS}


def test_a_tiny_model_learns_one_image_per_class() -> None:
    model = tiny(d_model=32).train()
    targets = torch.tensor([[0] * 12, [4] * 12, [0, 4] * 6])  # black, white, stripes
    cond = torch.tensor([[1], [2], [3]])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = F.cross_entropy(model(cond, targets).flatten(0, 1), targets.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05
    greedy = sample_tokens(model, cond, sampling=Sampling(temperature=0.0))
    assert torch.equal(greedy, targets)


def test_text_conditions_use_the_runs_tokenizer() -> None:
    tokenizer = CharTokenizer.train(["a b", "c"])
    model = tiny("text", condition_vocab=tokenizer.vocab_size)
    ids, mask = condition_ids(model.config, ["a b", "c"], tokenizer)
    assert ids.tolist() == [[i + 1 for i in tokenizer.encode("a b")], [tokenizer.encode("c")[0] + 1, 0, 0]]
    assert mask.tolist() == [[True] * 3, [True, False, False]]
    with pytest.raises(ValueError, match=r"never saw: \['z'\]"):
        condition_ids(model.config, ["a z"], tokenizer)
    with pytest.raises(ValueError, match="at most 6"):
        condition_ids(model.config, ["a b a b a b"], tokenizer)
    with pytest.raises(ValueError, match="needs its tokenizer"):
        condition_ids(model.config, ["a"])


def test_bad_conditions_and_settings_fail_clearly() -> None:
    model = tiny()
    with pytest.raises(ValueError, match=r"unknown class 'seven'.*'a', 'b', 'c'"):
        condition_ids(model.config, ["seven"])
    with pytest.raises(ValueError, match="unknown class 9"):
        condition_ids(model.config, [9])
    for scale in (-1.0, float("nan"), 100.0):
        with pytest.raises(ValueError, match="guidance scale must be"):
            model.bind(torch.tensor([[1]]), guidance_scale=scale)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        Sampling(temperature=-0.5)
    with pytest.raises(ValueError, match=r"pixel tokens of shape \(batch, 12\)"):
        model(torch.tensor([[1]]), torch.zeros(1, 10, dtype=torch.long))
    with pytest.raises(ValueError, match="condition id 4 is outside"):
        model(torch.tensor([[4]]), torch.zeros(1, 12, dtype=torch.long))
    with pytest.raises(ConfigError, match="palette"):
        ImageGenConfig(palette=(0.0,))
    with pytest.raises(ConfigError, match="condition_length must be 1"):
        ImageGenConfig(condition_length=3)


def test_seed_sketch_has_the_sketchs_shape() -> None:
    config = get_config("seed-sketch")
    assert (config.d_model, config.n_heads, config.n_encoder_layers, config.n_decoder_layers) == (64, 4, 2, 2)
    assert build_model("seed-sketch").num_parameters() > 0


def test_image_grid_has_one_row_per_condition(tmp_path) -> None:
    from PIL import Image

    images = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 1), dtype=np.uint8)
    path = save_image_grid(images, ["zero", "one"], tmp_path / "grid.png", scale=4)
    grid = Image.open(path)
    assert grid.height == 2 * (8 * 4 + 2)
    with pytest.raises(ValueError, match="cannot be split into 4 equal rows"):
        save_image_grid(images, ["a", "b", "c", "d"], tmp_path / "bad.png")

"""Image sampling refuses sizes it cannot hold before any work: images per condition, the batch
size, and conditions x images, each with the bound and why."""

import numpy as np
import pytest
import torch

from tformer.inference import Sampling
from tformer.inference.images import MAX_IMAGES, sample_images
from tformer.models.image_gen import ImageGenConfig, ImageGenerator


@pytest.fixture(scope="module")
def model() -> ImageGenerator:
    torch.manual_seed(0)
    greys = tuple(float(v) for v in np.linspace(0, 255, 5))
    return ImageGenerator(ImageGenConfig(height=2, width=2, palette=greys, labels=("a", "b"),
                                         condition_vocab=2, condition_length=1, d_model=16, n_heads=2)).eval()


def test_small_requests_are_drawn(model):
    images = sample_images(model, ["a", "b"], 3, Sampling(), seed=0, batch_size=4)
    assert images.shape == (6, 2, 2, 1)


@pytest.mark.parametrize("kwargs, message", [
    (dict(per_condition=10**9), r"per_condition=1000000000 is more than 65,536 \(images per condition"),
    (dict(per_condition=0), "per_condition must be >= 1"),
    (dict(per_condition=2.5), "per_condition must be a whole number"),
    (dict(batch_size=10**6), r"batch_size=1000000 is more than 4,096 \(images decoded together"),
    (dict(batch_size=0), "batch_size must be >= 1"),
    (dict(per_condition=MAX_IMAGES // 2 + 1), r"conditions x per_condition=.* is more than 65,536"),
])
def test_sizes_beyond_the_bounds_are_one_line(model, kwargs, message):
    with pytest.raises(ValueError, match=message) as caught:
        sample_images(model, ["a", "b"], **kwargs)
    assert "\n" not in str(caught.value)

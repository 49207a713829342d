"""Image classification with a Vision Transformer: Fashion-MNIST, MNIST, scikit-learn's digits,
an .npz or an image folder. Light augmentation (random shifts, and flips where they make sense);
validation on a stratified share of the training images; `evaluate` scores the source's test split
(or a held-out share for sources without one) with accuracy, macro F1, a confusion matrix PNG and
the inference throughput. Pixels enter the model as (x / 255 - 0.5) / 0.5, as Hugging Face's
ViT image processor feeds them.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tformer.config import ConfigError, check_fraction, check_positive
from tformer.data.images import ImageSet, augment, check_image_shape, has_test_split, images_to_tensor, load_images, stratified_holdout
from tformer.models import family_of, get_config
from tformer.models.vit import ViT
from tformer.training.tasks.base import Batch, Prepared
from tformer.training.tasks.classification import classification_metrics, plot_confusion

if TYPE_CHECKING:
    from tformer.training.recipe import Recipe

log = logging.getLogger(__name__)

MODEL_KEYS = ()
CONFUSION_PNG = "confusion.png"


@dataclass(frozen=True)
class DataSpec:
    source: str = "fashion-mnist"  # fashion-mnist | mnist-10k | digits | an .npz | an image folder
    val_fraction: float = 0.1  # stratified share of the training images, for validation
    test_fraction: float = 0.1  # held out for evaluate() when the source has no test split
    split_seed: int = 0
    shift: int = 0  # augmentation: random translation by up to this many pixels
    flip: bool = False  # augmentation: random horizontal flips (not for digits or text)
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        check_fraction("data.val_fraction", self.val_fraction)
        check_fraction("data.test_fraction", self.test_fraction)
        check_fraction("data.label_smoothing", self.label_smoothing)
        check_positive("data.shift", self.shift, allow_zero=True)
        if self.val_fraction == 0 or self.test_fraction == 0:
            raise ConfigError("data.val_fraction and data.test_fraction must be > 0: validation picks the "
                              "best checkpoint, the test share is what evaluate scores")


def normalise(images: Tensor) -> Tensor:
    """[0, 1] pixels -> [-1, 1] (mean 0.5, std 0.5 per channel)."""
    return (images - 0.5) / 0.5


class ImageClassificationTask:
    """Shuffled batches of images (augmented while training); a step's batch and its augmentation
    are a pure function of (seed, step)."""

    name = "image_classification"

    def __init__(self, train: ImageSet, val: ImageSet, *, batch_size: int, seed: int, data: DataSpec) -> None:
        self.images, self.labels = images_to_tensor(train.images), torch.from_numpy(train.labels)
        self.val_images, self.val_labels = images_to_tensor(val.images), torch.from_numpy(val.labels)
        self.batch_size, self.seed, self.data = batch_size, seed, data
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.labels))}
        return self._orders[epoch]

    def train_batch(self, step: int, shard: int, n_shards: int) -> Batch:
        n, rows = len(self.labels), self.batch_size // n_shards
        positions = np.arange(step * self.batch_size, (step + 1) * self.batch_size)
        index = torch.from_numpy(np.array([self._order(int(p // n))[p % n] for p in positions]))
        generator = torch.Generator().manual_seed(int(np.random.default_rng([self.seed, step]).integers(2**62)))
        images = augment(self.images[index], generator, shift=self.data.shift, flip=self.data.flip)
        part = slice(shard * rows, (shard + 1) * rows)  # labels first: the progress line counts images
        return {"labels": self.labels[index][part], "images": normalise(images[part])}

    def eval_batches(self, rank: int, world_size: int) -> Iterable[Batch]:
        for start in range(0, len(self.val_labels), self.batch_size):
            index = np.array_split(np.arange(start, min(start + self.batch_size, len(self.val_labels))),
                                   world_size)[rank]
            if len(index):
                yield {"labels": self.val_labels[index], "images": normalise(self.val_images[index])}

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        smoothing = self.data.label_smoothing if model.training else 0.0
        return F.cross_entropy(model(batch["images"]).float(), batch["labels"], label_smoothing=smoothing)

    def samples(self, model: nn.Module) -> list[str]:
        return []


def load_splits(data: DataSpec) -> tuple[ImageSet, ImageSet, ImageSet, str]:
    """(train, validation, test, name of the test split)."""
    images = load_images(data.source, "train")
    if has_test_split(data.source):
        test, test_name = load_images(data.source, "test"), "test split"
        check_image_shape(test, images.image_shape, f"the training images of {data.source}")
    else:
        rest, held = stratified_holdout(images.labels, data.test_fraction, data.split_seed)
        images, test = images.subset(rest), images.subset(held)
        test_name = f"held-out {data.test_fraction:.0%}"
    train_index, val_index = stratified_holdout(images.labels, data.val_fraction, data.split_seed + 1)
    return images.subset(train_index), images.subset(val_index), test, test_name


def prepare(recipe: Recipe, tokenizer_for: Any) -> Prepared:
    """Images and splits, a ViT sized to them (image size, channels, classes) and the task."""
    data: DataSpec = recipe.data  # type: ignore[assignment]
    train, val, _, _ = load_splits(data)
    height, width, channels = train.image_shape
    if height != width:
        raise ConfigError(f"{data.source}: ViT needs square images, these are {height}x{width}; "
                          "crop or pad them to a square")
    overrides = {k: v for k, v in recipe.model.items() if k != "preset"}
    config = get_config(recipe.model["preset"], **{**overrides, "image_size": height, "channels": channels,
                                                   "n_classes": len(train.label_names),
                                                   "labels": train.label_names})
    torch.manual_seed(recipe.training.seed)
    model = ViT(config)
    log.info("image classification: %d training / %d validation %dx%dx%d images, %d classes, %s parameters",
             len(train), len(val), height, width, channels, len(train.label_names), f"{model.num_parameters():,}")
    task = ImageClassificationTask(train, val, batch_size=recipe.training.batch_size, seed=recipe.training.seed,
                                   data=data)
    return Prepared(model, task, None, {"model_family": family_of(config), "has_tokenizer": False,
                                        "model_config": dataclasses.asdict(config)})


def predict(model: nn.Module, images: Tensor, batch_size: int = 256) -> tuple[np.ndarray, float]:
    """Predicted classes of [0, 1] images (N, C, H, W), and images per second."""
    model.eval()
    out, start = [], time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            out.append(model(normalise(images[i:i + batch_size])).argmax(-1))
    return torch.cat(out).numpy(), len(images) / (time.perf_counter() - start)


def evaluate(recipe: Recipe, model: nn.Module, tokenizer: Any) -> dict[str, Any]:
    """Accuracy, macro F1 and per-class F1 on the test split, confusion.png, images/s."""
    data: DataSpec = recipe.data  # type: ignore[assignment]
    labels = model.config.labels  # type: ignore[union-attr]
    _, _, test, test_name = load_splits(data)
    check_image_shape(test, (model.config.image_size, model.config.image_size, model.config.channels),  # type: ignore[union-attr]
                      "this ViT")
    predicted, images_per_s = predict(model, images_to_tensor(test.images))
    metrics = classification_metrics(test.labels, predicted, len(labels))
    png = Path(recipe.run_dir) / CONFUSION_PNG
    plot_confusion(metrics["confusion"], labels, png, title=f"{data.source}: {test_name}")
    result = {"split": test_name, "examples": len(test), "accuracy": metrics["accuracy"],
              "macro_f1": metrics["macro_f1"], "images_per_s": images_per_s}
    result.update({f"f1[{name}]": f1 for name, f1 in zip(labels, metrics["f1"])})
    return {**result, "confusion_png": str(png)}

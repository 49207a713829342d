"""Image classification with a Vision Transformer: Fashion-MNIST, MNIST, scikit-learn's digits,
an .npz or an image folder. Light augmentation (random shifts, and flips where they make sense);
validation on a stratified share of the training images; `evaluate` scores the source's test split
(or a held-out share for sources without one) with accuracy, macro F1, a confusion matrix PNG and
the inference throughput. Pixels enter the model as (x / 255 - 0.5) / 0.5, as Hugging Face's
ViT image processor feeds them.

Adversarial training (`training.adversarial: pgd`): each training batch's loss is
(1 - w) * clean + w * the loss on PGD (L-inf, random start) images made against the current model
in eval mode (Madry et al. 2018); validation stays clean. The attack's random start is a pure
function of (seed, step, shard), so a resumed run makes the same adversarial images.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tformer.attacks.image import pgd_images
from tformer.config import ConfigError, check_fraction, check_positive
from tformer.data.images import (
    ImageSet,
    augment,
    check_image_shape,
    has_test_split,
    images_to_tensor,
    load_images,
    stratified_holdout,
)
from tformer.metrics.classification import classification_metrics, plot_confusion
from tformer.models.protocols import ImageClassifier
from tformer.models.vit import normalise
from tformer.nn.modes import evaluating
from tformer.training.settings import TaskSettings, TrainConfig
from tformer.training.tasks.base import (Batch, EpochSampler, TaskData, data_fingerprint, eval_shards,
                                         model_device)

log = logging.getLogger(__name__)

NEEDS = ImageClassifier
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


class ImageClassificationTask:
    """Shuffled batches of images (augmented while training); a step's batch and its augmentation
    are a pure function of (seed, step)."""

    name = "image_classification"

    def __init__(self, train: ImageSet, val: ImageSet, *, batch_size: int, seed: int, data: DataSpec,
                 adversary: TrainConfig | None = None) -> None:
        self.images, self.labels = images_to_tensor(train.images), torch.from_numpy(train.labels)
        self.val_images, self.val_labels = images_to_tensor(val.images), torch.from_numpy(val.labels)
        self.batch_size, self.seed, self.data = batch_size, seed, data
        self.sampler = EpochSampler(len(self.labels), batch_size, seed)
        self.adversary = adversary if adversary is not None and adversary.adversarial == "pgd" else None

    @staticmethod
    def _batch(images: Tensor, labels: Tensor, attack_seed: int | None = None) -> Batch:
        return Batch({"labels": labels, "images": normalise(images)}, len(labels),
                     int(images[0, 0].numel()) * len(labels), context=attack_seed)  # pixels per channel

    def train_batch(self, step: int, shard: int, n_shards: int) -> Batch:
        rows = self.batch_size // n_shards
        index = torch.from_numpy(self.sampler.indices(step))
        generator = torch.Generator().manual_seed(int(np.random.default_rng([self.seed, step]).integers(2**62)))
        images = augment(self.images[index], generator, shift=self.data.shift, flip=self.data.flip)
        part = slice(shard * rows, (shard + 1) * rows)  # the whole batch is augmented: shards agree
        attack_seed = int(np.random.default_rng([self.seed, step, shard, 1]).integers(2**62))
        return self._batch(images[part], self.labels[index][part], attack_seed)

    def eval_batches(self, rank: int, world_size: int) -> Iterable[Batch]:
        for index in eval_shards(len(self.val_labels), self.batch_size, rank, world_size):
            yield self._batch(self.val_images[index], self.val_labels[index])

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """Cross-entropy; while training with an adversary, (1 - w) * clean + w * adversarial."""
        smoothing = self.data.label_smoothing if model.training else 0.0
        if self.adversary is None or not model.training:
            return F.cross_entropy(model(batch["images"]).float(), batch["labels"], label_smoothing=smoothing)
        weight = self.adversary.adversarial_weight
        adversarial = normalise(self.adversarial_pixels(model, batch))
        loss = weight * F.cross_entropy(model(adversarial).float(), batch["labels"], label_smoothing=smoothing)
        if weight < 1:
            loss = loss + (1 - weight) * F.cross_entropy(model(batch["images"]).float(), batch["labels"],
                                                         label_smoothing=smoothing)
        return loss

    def adversarial_pixels(self, model: nn.Module, batch: Batch) -> Tensor:
        """PGD images in [0, 1] (B, C, H, W) against the current weights, made in eval mode (then
        back to train mode); the unwrapped model is attacked, so DDP's reducer sees one backward."""
        assert self.adversary is not None
        target = unwrap(model)
        pixels = (batch["images"] * 0.5 + 0.5).clamp(0, 1)  # undo normalise: the attack works on [0, 1]
        generator = torch.Generator(device=pixels.device).manual_seed(batch.context or 0)
        with evaluating(target), torch.autocast(pixels.device.type, enabled=False):
            return pgd_images(target, pixels, batch["labels"], self.adversary.adversarial_epsilon,
                              steps=self.adversary.adversarial_steps, step_size=self.adversary.adversarial_step,
                              generator=generator)

    def samples(self, model: nn.Module) -> list[str]:
        return []

    # -- partitioning (tasks.base.Partitionable): federated learning deals the examples out ------
    def example_labels(self) -> np.ndarray:
        return self.labels.numpy()

    def keep_training(self, index: np.ndarray) -> ImageClassificationTask:
        """A copy that trains on the images at `index` only (validation unchanged)."""
        index = torch.from_numpy(np.asarray(index, dtype=np.int64))
        task = copy.copy(self)
        task.images, task.labels = self.images[index], self.labels[index]
        task.sampler = EpochSampler(len(index), self.batch_size, self.seed)
        return task

    @torch.no_grad()
    def accuracy(self, model: nn.Module) -> float:
        """The share of validation images whose predicted class is the true one."""
        right, device = 0, model_device(model)
        with evaluating(model):
            for batch in self.eval_batches(0, 1):
                guesses = model(batch["images"].to(device)).argmax(-1).cpu()
                right += int((guesses == batch["labels"]).sum())
        return right / len(self.val_labels)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside torch.compile (`_orig_mod`) and DDP (`module`) wrappers."""
    while isinstance(getattr(model, "_orig_mod", None), nn.Module) or isinstance(getattr(model, "module", None), nn.Module):
        model = getattr(model, "_orig_mod", None) or model.module  # type: ignore[assignment]
    return model


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


def prepare(settings: TaskSettings, tokenizer_for: Any) -> TaskData:
    """Images and splits; the model takes their size, channels and classes."""
    data: DataSpec = settings.data
    train, val, _, _ = load_splits(data)
    height, width, channels = train.image_shape
    if height != width:
        raise ConfigError(f"{data.source}: ViT needs square images, these are {height}x{width}; "
                          "crop or pad them to a square")
    present = [train.label_names[i] for i in np.unique(train.labels)]
    if len(present) < 2:  # one class: every guess is right, accuracy 1.0, nothing learned
        raise ConfigError(f"{data.source} holds images of one class ({', '.join(map(repr, present))}): "
                          "an image classifier needs at least 2; add a folder of images per class")
    log.info("image classification: %d training / %d validation %dx%dx%d images, %d classes", len(train),
             len(val), height, width, channels, len(train.label_names))
    fields = {"image_size": height, "channels": channels, "n_classes": len(train.label_names),
              "labels": train.label_names}
    t = settings.training
    if t.adversarial == "embedding":
        raise ConfigError("training.adversarial: embedding perturbs token embeddings, for text classifiers; "
                          "an image classifier trains against pixels with training.adversarial=pgd")
    fingerprint = data_fingerprint([train.images, train.labels, val.images, val.labels])
    return TaskData(None, fields, lambda model: ImageClassificationTask(
        train, val, batch_size=t.batch_size, seed=t.seed, data=data, adversary=t), notes=fingerprint)


def predict(model: nn.Module, images: Tensor, batch_size: int = 256) -> tuple[np.ndarray, float]:
    """Predicted classes of [0, 1] images (N, C, H, W), and images per second."""
    model.eval()
    out, start = [], time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            out.append(model.classify(images[i:i + batch_size]).argmax(-1))  # type: ignore[operator]
    return torch.cat(out).numpy(), len(images) / (time.perf_counter() - start)


def evaluate(settings: TaskSettings, model: nn.Module, tokenizer: Any) -> dict[str, Any]:
    """Accuracy, macro F1 and per-class F1 on the test split, confusion.png, images/s."""
    data: DataSpec = settings.data
    labels = model.config.labels  # type: ignore[union-attr]
    _, _, test, test_name = load_splits(data)
    check_image_shape(test, (model.config.image_size, model.config.image_size, model.config.channels),  # type: ignore[union-attr]
                      "this ViT")
    predicted, images_per_s = predict(model, images_to_tensor(test.images))
    metrics = classification_metrics(test.labels, predicted, len(labels))
    png = Path(settings.run_dir) / CONFUSION_PNG
    plot_confusion(metrics["confusion"], labels, png, title=f"{data.source}: {test_name}")
    result = {"split": test_name, "examples": len(test), "accuracy": metrics["accuracy"],
              "macro_f1": metrics["macro_f1"], "images_per_s": images_per_s}
    result.update({f"f1[{name}]": f1 for name, f1 in zip(labels, metrics["f1"])})
    return {**result, "confusion_png": str(png)}

"""Class- or prompt-conditioned image generation: images become pixel tokens through a palette,
an `ImageGenerator` learns p(pixel | earlier pixels, condition) with condition dropout (for
classifier-free guidance), and an independent judge scores what it draws.

Evaluation (`tformer evaluate`) is one a person can trust: a scikit-learn classifier trained on
the real training images reports how often a sample is recognised as the class it was asked for,
and a Fréchet distance in a PCA space fitted on real images compares the sets; both are reported
for the samples, for held-out real images (the ceiling) and for independent per-pixel sampling
per class (the naive baseline). Every evaluation writes `samples.png` (one row per class).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tformer.config import ConfigError, check_choice, check_fraction, check_positive
from tformer.data.images import ImageSet, check_image_shape, has_test_split, load_images, stratified_holdout
from tformer.data.palette import fit_palette, grey_palette
from tformer.inference.generate import Sampling
from tformer.inference.images import condition_ids, sample_images, save_image_grid
from tformer.metrics.images import ImageJudge, per_pixel_baseline
from tformer.models.image_gen import CONDITIONS, NULL, check_guidance
from tformer.models.protocols import ImageSampler
from tformer.training.settings import TaskSettings
from tformer.training.tasks.base import Batch, EpochSampler, TaskData, data_fingerprint, eval_shards, shard_rows

log = logging.getLogger(__name__)

NEEDS = ImageSampler
SAMPLES_PNG = "samples.png"
DIGITS_LEVELS = 17  # sklearn's digits have 17 grey levels: a 17-colour palette is lossless


@dataclass(frozen=True)
class DataSpec:
    source: str = "digits"  # digits | mnist-10k | fashion-mnist | an .npz | an image folder
    val_fraction: float = 0.1  # stratified hold-out of the training images (validation loss)
    split_seed: int = 0
    condition: str = "label"  # label: the class; text: a prompt made from `prompts`
    prompts: tuple[str, ...] = ("a handwritten {name}",)  # text: templates, {name} = class name
    levels: int | None = None  # pixel tokens (palette size); None: 17 for digits, else 16
    guidance_dropout: float = 0.1  # training: share of conditions replaced by the null condition
    guidance_scale: float = 2.0  # sampling: 1 = plain conditional, > 1 = classifier-free guidance
    temperature: float = 1.0
    top_k: int | None = None
    samples_per_class: int = 8  # samples.png at every evaluation
    judge_samples_per_class: int = 100  # generated (and real, and baseline) images per class judged

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompts", tuple(self.prompts))
        check_choice("data.condition", self.condition, CONDITIONS)
        check_fraction("data.val_fraction", self.val_fraction)
        if self.val_fraction == 0:
            raise ConfigError("data.val_fraction must be > 0 (the validation loss picks the best checkpoint)")
        check_fraction("data.guidance_dropout", self.guidance_dropout)
        if self.condition == "text" and not all("{name}" in p for p in self.prompts) or not self.prompts:
            raise ConfigError(f"data.prompts must be templates holding {{name}}, got {list(self.prompts)}")
        if self.levels is not None and not 2 <= self.levels <= 4096:
            raise ConfigError(f"data.levels must be in [2, 4096], got {self.levels}")
        try:
            check_guidance(self.guidance_scale)
            Sampling(self.temperature, self.top_k)
        except ValueError as e:
            raise ConfigError(f"data: {e}") from None
        check_positive("data.samples_per_class", self.samples_per_class)
        check_positive("data.judge_samples_per_class", self.judge_samples_per_class)

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.temperature, self.top_k)


@dataclass
class Conditions:
    """Condition ids of every (template, class): ids (P, C, L) and mask (P, C, L); label
    conditions have P = 1 and L = 1. Row [p, c] is prompt template p filled with class c."""

    ids: Tensor
    mask: Tensor

    def of(self, labels: Tensor, templates: Tensor) -> tuple[Tensor, Tensor]:
        return self.ids[templates, labels], self.mask[templates, labels]


class ImageGenerationTask:
    """Batches of pixel tokens with their conditions; a step's batch (which images, which
    conditions are dropped, which prompt templates) is a pure function of (seed, step)."""

    name = "image_generation"

    def __init__(self, train: ImageSet, val: ImageSet, conditions: Conditions, *, tokens: np.ndarray,
                 val_tokens: np.ndarray, batch_size: int, seed: int, data: DataSpec, run_dir: Path,
                 tokenizer: Any = None) -> None:
        self.train, self.val, self.conditions = train, val, conditions
        self.tokens, self.val_tokens = torch.from_numpy(tokens), torch.from_numpy(val_tokens)
        self.labels, self.val_labels = torch.from_numpy(train.labels), torch.from_numpy(val.labels)
        self.batch_size, self.seed, self.data, self.run_dir = batch_size, seed, data, run_dir
        self.tokenizer, self._judge = tokenizer, None
        self.sampler = EpochSampler(len(self.tokens), batch_size, seed)

    @staticmethod
    def _batch(tensors: dict[str, Tensor]) -> Batch:
        return Batch(tensors, len(tensors["tokens"]), tensors["tokens"].numel())

    def _global_batch(self, step: int) -> dict[str, Tensor]:
        index = torch.from_numpy(self.sampler.indices(step))
        generator = torch.Generator().manual_seed(int(np.random.default_rng([self.seed, step]).integers(2**62)))
        dropped = torch.rand(len(index), generator=generator) < self.data.guidance_dropout
        templates = torch.randint(len(self.conditions.ids), (len(index),), generator=generator)
        ids, mask = self.conditions.of(self.labels[index], templates)
        ids, mask = ids.clone(), mask.clone()
        ids[dropped], mask[dropped] = NULL, False
        mask[dropped, 0] = True  # the null condition is one real token
        return {"tokens": self.tokens[index], "cond_ids": ids, "cond_mask": mask}

    def train_batch(self, step: int, shard: int, n_shards: int) -> Batch:
        return self._batch(shard_rows(self._global_batch(step), shard, n_shards))

    def eval_batches(self, rank: int, world_size: int) -> Iterable[Batch]:
        """Every validation image once, with its class's condition (first template)."""
        for index in eval_shards(len(self.val_tokens), self.batch_size, rank, world_size):
            labels = self.val_labels[index]
            ids, mask = self.conditions.of(labels, torch.zeros_like(labels))
            yield self._batch({"tokens": self.val_tokens[index], "cond_ids": ids, "cond_mask": mask})

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """Mean cross-entropy per pixel token (nats)."""
        logits = model(batch["cond_ids"], batch["tokens"], cond_mask=batch["cond_mask"])  # (B, HW, K)
        return F.cross_entropy(logits.flatten(0, 1).float(), batch["tokens"].flatten())

    def judge(self) -> ImageJudge:
        if self._judge is None:
            self._judge = ImageJudge().fit(self.train.images, self.train.labels)
        return self._judge

    def samples(self, model: nn.Module) -> list[str]:
        """samples.png (one row per class) and how often the judge recognises those samples."""
        names = self.train.label_names
        n = self.data.samples_per_class
        images = generate_for_classes(model, names, n, self.data, self.tokenizer, seed=self.seed)
        path = save_image_grid(images, names, self.run_dir / SAMPLES_PNG)
        labels = np.repeat(np.arange(len(names)), n)
        rate = self.judge().recognition_rate(images, labels)
        return [f"{path.name}: {len(images)} samples at guidance {self.data.guidance_scale:g}; the judge "
                f"recognises {rate:.0%} as the class asked for"]


def generate_for_classes(model: nn.Module, names: tuple[str, ...], per_class: int, data: DataSpec,
                         tokenizer: Any, *, seed: int, guidance_scale: float | None = None) -> np.ndarray:
    """`per_class` samples of every class, grouped by class (the first prompt template)."""
    conditions = (list(names) if model.config.condition == "label"  # type: ignore[union-attr]
                  else [data.prompts[0].format(name=name) for name in names])
    scale = data.guidance_scale if guidance_scale is None else guidance_scale
    return sample_images(model, conditions, per_class, data.sampling,  # type: ignore[arg-type]
                         guidance_scale=scale, seed=seed, tokenizer=tokenizer)


def load_splits(data: DataSpec) -> tuple[ImageSet, ImageSet, ImageSet]:
    """(train, validation, held-out): validation is a stratified share of the training images;
    held-out is the source's test split when it has one, else the validation images."""
    train_all = load_images(data.source, "train")
    train_index, val_index = stratified_holdout(train_all.labels, data.val_fraction, data.split_seed)
    train, val = train_all.subset(train_index), train_all.subset(val_index)
    held_out = load_images(data.source, "test") if has_test_split(data.source) else val
    check_image_shape(held_out, train.image_shape, f"the training images of {data.source}")
    return train, val, held_out


def build_conditions(config: Any, templates: tuple[str, ...], tokenizer: Any) -> Conditions:
    """Condition ids of every (template, class), encoded as at inference (`condition_ids`) and
    right-padded to config.condition_length; label conditions have one template, "{name}"."""
    names = config.labels
    templates = templates if config.condition == "text" else ("{name}",)
    ids = torch.full((len(templates), len(names), config.condition_length), NULL, dtype=torch.long)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for p, template in enumerate(templates):
        row_ids, row_mask = condition_ids(config, [template.format(name=n) for n in names], tokenizer)
        ids[p, :, :row_ids.shape[1]], mask[p, :, :row_mask.shape[1]] = row_ids, row_mask
    return Conditions(ids, mask)


def _palette(data: DataSpec, train: ImageSet, seed: int) -> Any:
    if data.levels is None and data.source == "digits":
        return grey_palette(DIGITS_LEVELS)
    return fit_palette(train.images, data.levels or 16, seed=seed)


def prepare(settings: TaskSettings, tokenizer_for: Any) -> TaskData:
    """Images and a palette (and a character tokenizer for prompts); the model takes their size,
    channels, palette, classes and the longest condition."""
    data: DataSpec = settings.data
    t = settings.training
    train, val, _ = load_splits(data)
    names = train.label_names
    tokenizer, condition_length = None, 1
    if data.condition == "text":
        prompts = [template.format(name=n) for template in data.prompts for n in names]
        tokenizer = tokenizer_for(lambda: prompts)
        condition_length = max(len(tokenizer.encode(p)) for p in prompts)
    palette = _palette(data, train, t.seed)
    height, width, channels = train.image_shape
    fields = {"height": height, "width": width, "channels": channels,
              "palette": tuple(palette.colours.reshape(-1).tolist()), "condition": data.condition,
              "labels": names, "condition_vocab": len(names) if tokenizer is None else tokenizer.vocab_size,
              "condition_length": condition_length}
    log.info("image generation: %d training / %d validation %dx%dx%d images, %d classes, %d pixel tokens",
             len(train), len(val), height, width, channels, len(names), palette.size)

    def make_task(model: nn.Module) -> ImageGenerationTask:
        conditions = build_conditions(model.config, data.prompts, tokenizer)
        return ImageGenerationTask(train, val, conditions, tokens=palette.quantise(train.images),
                                   val_tokens=palette.quantise(val.images), batch_size=t.batch_size,
                                   seed=t.seed, data=data, run_dir=Path(settings.run_dir), tokenizer=tokenizer)

    fingerprint = data_fingerprint([train.images, train.labels, val.images, val.labels])
    return TaskData(tokenizer, fields, make_task, notes=fingerprint)


def evaluate(settings: TaskSettings, model: nn.Module, tokenizer: Any) -> dict[str, Any]:
    """Validation loss (nats and bits per pixel token), and the judge's scores for samples (with
    and without guidance), held-out real images and the per-pixel baseline; writes samples.png."""
    data: DataSpec = settings.data
    seed = settings.training.seed
    config = model.config  # type: ignore[union-attr]
    train, val, held_out = load_splits(data)
    check_image_shape(train, (config.height, config.width, config.channels), "this image generator")
    palette = model.palette()  # type: ignore[operator]
    conditions = build_conditions(config, data.prompts, tokenizer)
    val_tokens = palette.quantise(val.images)
    task = ImageGenerationTask(train, val, conditions, tokens=val_tokens, val_tokens=val_tokens,
                               batch_size=settings.training.batch_size, seed=seed, data=data,
                               run_dir=Path(settings.run_dir))
    model.eval()
    with torch.no_grad():
        batches = list(task.eval_batches(0, 1))
        val_loss = float(np.average([float(task.loss(model, b)) for b in batches],
                                    weights=[len(b["tokens"]) for b in batches]))
    judge, n = task.judge(), data.judge_samples_per_class
    wanted = np.repeat(np.arange(len(config.labels)), n)
    results: dict[str, Any] = {"val_loss": val_loss, "val_bits_per_pixel": val_loss / np.log(2)}
    for scale in dict.fromkeys([data.guidance_scale, 1.0]):
        images = generate_for_classes(model, config.labels, n, data, tokenizer, seed=seed + 1,
                                      guidance_scale=scale)
        results.update(_scored(f"generated_g{scale:g}", judge.score(images, wanted, train.images)))
        if scale == data.guidance_scale:
            grid = images.reshape(len(config.labels), n, *images.shape[1:])[:, :data.samples_per_class]
            path = save_image_grid(grid.reshape(-1, *images.shape[1:]), config.labels,
                                   Path(settings.run_dir) / SAMPLES_PNG)
    real = held_out.subset(_per_class(held_out.labels, n, seed))
    results.update(_scored("held_out_real", judge.score(real.images, real.labels, train.images)))
    base_images, base_labels = per_pixel_baseline(train.images, train.labels, n, seed=seed)
    results.update(_scored("per_pixel_baseline", judge.score(base_images, base_labels, train.images)))
    return {**results, "samples_png": str(path)}


def _scored(prefix: str, score: dict[str, float]) -> dict[str, Any]:
    return {f"{prefix}/recognised": score["recognised"], f"{prefix}/frechet": score["frechet"]}


def _per_class(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Up to n indices of every class (seeded)."""
    rng = np.random.default_rng(seed)
    picks = [rng.permutation(np.flatnonzero(labels == c))[:n] for c in np.unique(labels)]
    return np.sort(np.concatenate(picks))

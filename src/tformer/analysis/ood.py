"""Out-of-distribution detection for any classifier (`TextClassifier` or `ImageClassifier`): fit
statistics on in-distribution data, score new inputs (higher = more in-distribution), report
AUROC / AUPR / FPR95 per scorer.

    detector = fit(run.model, train_sentences, tokenizer=run.tokenizer)   # or images
    scores = detector.score(new_inputs)          # {"msp": (N,), "energy": ..., "mahalanobis": ..., "knn": ...}
    report = ood_report(detector, held_out, other_data)

Scorers:
    msp          maximum softmax probability (Hendrycks & Gimpel 2017)
    energy       -E(x) = T logsumexp(logits / T) (Liu et al. 2020; E is the free energy)
    mahalanobis  -min_c (f - mu_c)' S^-1 (f - mu_c) on penultimate features f, class means mu_c and
                 one shared covariance S fitted on in-distribution data (Lee et al. 2018)
    knn          -(distance to the k-th nearest in-distribution feature), features L2-normalised
                 (Sun et al. 2022)

Penultimate features are the input of the module that maps them to the logits, found by what it
does, not by its class: the linear map (a module with `in_features` and one output per class:
`nn.Linear`, an int8 `QuantizedLinear`, a `LoRALinear`, ...) whose output *is* the logits on a
probe batch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from tformer.data.images import IMAGE_SUFFIXES, read_image
from tformer.data.labelled import encode_texts, pad_rows, special_ids
from tformer.files import atomic_path, claim_output_folder, read_json, write_json_atomic
from tformer.metrics.ood import OODMetrics, check_scores, ood_metrics, roc_points
from tformer.models.protocols import ImageClassifier, TextClassifier, can, capabilities
from tformer.nn.modes import evaluating

log = logging.getLogger(__name__)

SCORERS = ("msp", "energy", "mahalanobis", "knn")
MARKER = ".tformer-ood"  # a folder tformer made for OOD results and statistics
STATISTICS = "ood-statistics.safetensors"
STATISTICS_META = "ood-statistics.json"
DEFAULT_K = 50  # Sun et al. 2022 use k = 50 on CIFAR-10's 50,000 training images

Inputs = Sequence[str] | np.ndarray | Sequence[Any]  # sentences | (N, H, W[, C]) uint8 | image files / arrays
Batch = tuple[Tensor, Tensor | None]  # (token ids, mask) or (images (B, C, H, W) in [0, 1], None)


# -- inputs --------------------------------------------------------------------------------------
def check_classifier(model: nn.Module) -> None:
    """One line unless `model` classifies sentences or images."""
    if not (can(model, TextClassifier) or can(model, ImageClassifier)):
        able = ", ".join(capabilities(model)) or "nothing tformer can use"
        raise ValueError(f"OOD detection needs a classifier (text or image), but this {type(model).__name__} "
                         f"can: {able}; fine-tune a classifier from it first")


def _image_array(image: Any, what: str, index: int) -> np.ndarray:
    """(H, W, C) uint8 from a file path or an (H, W[, C]) uint8 array; no resizing or colour change."""
    if isinstance(image, (str, Path)):
        if Path(image).suffix.lower() not in IMAGE_SUFFIXES or not Path(image).is_file():
            raise ValueError(f"{what}: {str(image)!r} is not an image file ({'/'.join(IMAGE_SUFFIXES)})")
        image = read_image(Path(image))
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise ValueError(f"{what}: image {index} must be (H, W) or (H, W, C) uint8, got {array.dtype} {array.shape}")
    return array if array.ndim == 3 else array[..., None]


def image_tensor(model: nn.Module, images: Inputs, what: str) -> Tensor:
    """(N, C, H, W) float in [0, 1] from uint8 images of exactly the model's (H, W, C): resizing or
    recolouring would change what is measured, so another shape is refused, naming it."""
    if isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim in (3, 4):
        array = images if images.ndim == 4 else images[..., None]
    else:
        array = np.stack([_image_array(x, what, i) for i, x in enumerate(images)])
    expected = tuple(model.image_shape)  # type: ignore[attr-defined]
    if tuple(array.shape[1:]) != expected:
        raise ValueError(f"{what} are images of (H, W, C) = {tuple(array.shape[1:])} but the model takes "
                         f"{expected}; resize or convert them to the model's size and channels first")
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).float() / 255.0


def text_rows(model: nn.Module, tokenizer: Any, texts: Inputs, what: str) -> list[np.ndarray]:
    """[CLS] ids [SEP] per sentence, framed as in training (`encode_texts`)."""
    if tokenizer is None:
        raise ValueError("this text classifier has no tokenizer: open it with tformer.runs.open_run(RUN)")
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()), None)
    if bad is not None:
        raise ValueError(f"{what}: input {bad} is {texts[bad]!r}, not a sentence; a text classifier takes "
                         "non-empty sentences")
    return encode_texts(list(texts), tokenizer, special_ids(tokenizer), max_length=model.max_tokens)  # type: ignore[attr-defined]


def batches(model: nn.Module, tokenizer: Any, inputs: Inputs, what: str, batch_size: int) -> list[Batch]:
    """The inputs as the model's `classify` takes them, in batches of `batch_size`."""
    check_classifier(model)
    if len(inputs) == 0:
        raise ValueError(f"{what} is empty: give at least one input")
    if can(model, TextClassifier):
        rows, pad = text_rows(model, tokenizer, inputs, what), special_ids(tokenizer).pad
        return [pad_rows(rows[i:i + batch_size], pad) for i in range(0, len(rows), batch_size)]
    pixels = image_tensor(model, inputs, what)
    return [(pixels[i:i + batch_size], None) for i in range(0, len(pixels), batch_size)]


# -- the forward pass ----------------------------------------------------------------------------
def _maps_features(module: nn.Module, n_classes: int) -> bool:
    """A linear map to one score per class, by its interface: in_features -> out_features."""
    ins, outs = getattr(module, "in_features", None), getattr(module, "out_features", None)
    return isinstance(ins, int) and isinstance(outs, int) and outs == n_classes


def find_feature_layer(model: nn.Module, probe: Batch) -> str:
    """The name of the linear map whose output equals the logits of `probe`: the layer that maps
    penultimate features to class scores, whatever the family calls it and whatever the layer's
    class (plain, quantized or LoRA-adapted: any module with `in_features` and `out_features`)."""
    n_classes = len(model.labels)  # type: ignore[attr-defined]
    outputs: dict[str, Tensor] = {}
    candidates = {name: m for name, m in model.named_modules() if _maps_features(m, n_classes)}
    hooks = [m.register_forward_hook(lambda _m, _i, out, name=name: outputs.__setitem__(name, out))
             for name, m in candidates.items()]
    try:
        with evaluating(model), torch.no_grad():
            logits = model.classify(*probe)  # type: ignore[attr-defined]
    finally:
        for hook in hooks:
            hook.remove()
    found = [name for name, out in outputs.items()
             if isinstance(out, Tensor) and out.shape == logits.shape and torch.equal(out, logits)]
    if not found:
        raise ValueError(f"cannot find the layer that maps features to logits in this {type(model).__name__} "
                         f"(no linear layer with {n_classes} outputs gives the logits); use the msp and energy "
                         "scorers, which need logits only")
    return found[-1]


@dataclass(frozen=True)
class Outputs:
    logits: np.ndarray  # (N, n_classes) float64
    features: np.ndarray  # (N, D) float64: the input of the feature layer


def forward(model: nn.Module, inputs: list[Batch], layer: str) -> Outputs:
    """Logits and penultimate features of every batch; no gradients, the model's mode restored."""
    captured: list[Tensor] = []
    module = dict(model.named_modules())[layer]
    hook = module.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
    logits = []
    try:
        with evaluating(model), torch.no_grad():
            for batch in inputs:
                logits.append(model.classify(*batch).detach())  # type: ignore[attr-defined]
    finally:
        hook.remove()
    return Outputs(torch.cat(logits).double().numpy(), torch.cat(captured).double().numpy())


# -- scorers: numpy, higher = more in-distribution -----------------------------------------------
def _logsumexp(x: np.ndarray) -> np.ndarray:
    top = x.max(axis=1, keepdims=True)
    return (top + np.log(np.exp(x - top).sum(axis=1, keepdims=True)))[:, 0]


def msp_score(logits: np.ndarray) -> np.ndarray:
    """max_c softmax(logits)_c, (N, K) -> (N,)."""
    return np.exp(logits.max(axis=1) - _logsumexp(logits))


def free_energy(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """E(x) = -T logsumexp(logits / T), (N, K) -> (N,); in-distribution inputs have lower energy."""
    return -temperature * _logsumexp(logits / temperature)


def energy_score(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """-E(x): higher = more in-distribution."""
    return -free_energy(logits, temperature)


def fit_gaussian(features: np.ndarray, labels: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Class means (K, D) and the (pseudo-)inverse of the covariance shared by all classes (D, D),
    the maximum-likelihood estimate sum_c sum_{i in c} (f_i - mu_c)(f_i - mu_c)' / N. A class
    without examples keeps a NaN mean and is skipped when scoring."""
    means = np.full((n_classes, features.shape[1]), np.nan)
    centred = np.empty_like(features)
    for c in np.unique(labels):
        members = labels == c
        means[c] = features[members].mean(axis=0)
        centred[members] = features[members] - means[c]
    covariance = centred.T @ centred / len(features)
    return means, np.linalg.pinv(covariance, hermitian=True)


def mahalanobis_score(features: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """-min_c (f - mu_c)' P (f - mu_c) over the classes with a mean, (N, D) -> (N,)."""
    distances = []
    for mean in means[~np.isnan(means).any(axis=1)]:
        diff = features - mean  # (N, D)
        distances.append(np.einsum("nd,de,ne->n", diff, precision, diff))
    return -np.min(np.stack(distances), axis=0)


def l2_normalise(features: np.ndarray) -> np.ndarray:
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


def knn_score(features: np.ndarray, bank: np.ndarray, k: int, chunk: int = 1024) -> np.ndarray:
    """-(Euclidean distance to the k-th nearest row of `bank`, L2-normalised), features
    L2-normalised first; (N, D) -> (N,)."""
    if not 1 <= k <= len(bank):
        raise ValueError(f"k must be in [1, {len(bank)}] (the fitted examples), got {k}")
    queries, out = l2_normalise(features), []
    for start in range(0, len(queries), chunk):
        squared = np.maximum(2.0 - 2.0 * queries[start:start + chunk] @ bank.T, 0.0)  # unit vectors
        out.append(np.sqrt(np.partition(squared, k - 1, axis=1)[:, k - 1]))
    return -np.concatenate(out)


# -- the detector ----------------------------------------------------------------------------------
@dataclass
class OODDetector:
    """A classifier with statistics fitted on in-distribution data; `score` any inputs."""

    model: nn.Module
    tokenizer: Any
    layer: str  # the module whose input is the penultimate feature
    means: np.ndarray  # (K, D) class means
    precision: np.ndarray  # (D, D) inverse shared covariance
    bank: np.ndarray  # (N_fit, D) L2-normalised in-distribution features
    k: int
    temperature: float = 1.0
    batch_size: int = 64
    seconds: dict[str, float] = field(default_factory=dict)  # time spent per stage, last call

    def outputs(self, inputs: Inputs, what: str = "inputs") -> Outputs:
        return forward(self.model, batches(self.model, self.tokenizer, inputs, what, self.batch_size), self.layer)

    def score_outputs(self, outputs: Outputs, scorers: Sequence[str] = SCORERS) -> dict[str, np.ndarray]:
        """Each scorer's (N,) scores of already computed outputs; `seconds` holds each one's time."""
        functions = {"msp": lambda: msp_score(outputs.logits),
                     "energy": lambda: energy_score(outputs.logits, self.temperature),
                     "mahalanobis": lambda: mahalanobis_score(outputs.features, self.means, self.precision),
                     "knn": lambda: knn_score(outputs.features, self.bank, self.k)}
        unknown = [s for s in scorers if s not in functions]
        if unknown:
            raise ValueError(f"unknown scorer(s) {unknown}; choose from {list(SCORERS)}")
        scores = {}
        for name in scorers:
            start = time.perf_counter()
            scores[name] = functions[name]()
            self.seconds[name] = time.perf_counter() - start
        return scores

    def score(self, inputs: Inputs, scorers: Sequence[str] = SCORERS, what: str = "inputs") -> dict[str, np.ndarray]:
        """Scores (N,) per scorer; higher = more in-distribution."""
        start = time.perf_counter()
        outputs = self.outputs(inputs, what)
        self.seconds["forward"] = time.perf_counter() - start
        return self.score_outputs(outputs, scorers)

    def save(self, folder: str | Path) -> Path:
        """Statistics as safetensors + JSON in `folder`: new, empty, or one tformer's OOD tools made."""
        folder = prepare_folder(Path(folder), "the statistics folder")
        from safetensors.numpy import save_file

        with atomic_path(folder / STATISTICS) as tmp:
            save_file({"means": self.means, "precision": self.precision, "bank": self.bank}, str(tmp))
        write_json_atomic(folder / STATISTICS_META, {"layer": self.layer, "k": self.k, "temperature": self.temperature,
                                                     "labels": list(self.model.labels)}, indent=2)  # type: ignore[attr-defined]
        return folder

    @classmethod
    def load(cls, folder: str | Path, model: nn.Module, tokenizer: Any = None) -> OODDetector:
        """Statistics `save` wrote, for the same classifier (its labels and feature layer)."""
        from safetensors.numpy import load_file

        check_classifier(model)
        meta = read_json(Path(folder) / STATISTICS_META, "OOD statistics")
        if tuple(meta.get("labels", ())) != tuple(model.labels) or meta.get("layer") not in dict(model.named_modules()):  # type: ignore[attr-defined]
            raise ValueError(f"{folder} holds OOD statistics of another classifier (labels {meta.get('labels')}, "
                             f"layer {meta.get('layer')!r}); fit this one again")
        arrays = load_file(str(Path(folder) / STATISTICS))
        return cls(model, tokenizer, meta["layer"], arrays["means"], arrays["precision"], arrays["bank"],
                   int(meta["k"]), float(meta["temperature"]))


def prepare_folder(folder: Path, what: str) -> Path:
    """`folder` is new, empty, or marked as tformer OOD's; never a folder with a user's files."""
    return claim_output_folder(folder, MARKER, "tformer ood", what)


def fit(model: nn.Module, in_data: Inputs, *, tokenizer: Any = None, labels: np.ndarray | None = None,
        temperature: float = 1.0, k: int = DEFAULT_K, batch_size: int = 64) -> OODDetector:
    """Fit class means, shared covariance and the kNN bank on in-distribution data. `labels`
    (class indices into `model.labels`) default to the model's own predictions."""
    if not np.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a positive number, got {temperature}")
    if k < 1 or batch_size < 1:
        raise ValueError(f"k and batch_size must be >= 1, got k={k}, batch_size={batch_size}")
    start = time.perf_counter()
    inputs = batches(model, tokenizer, in_data, "the in-distribution data", batch_size)
    layer = find_feature_layer(model, inputs[0])
    outputs = forward(model, inputs, layer)
    n_classes = len(model.labels)  # type: ignore[attr-defined]
    if labels is None:
        labels = outputs.logits.argmax(axis=1)
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (len(outputs.logits),) or labels.min() < 0 or labels.max() >= n_classes:
        raise ValueError(f"labels must be {len(outputs.logits)} class indices in [0, {n_classes}), got shape "
                         f"{labels.shape}")
    if k > len(outputs.features):
        log.warning("k=%d is more than the %d fitted examples; using k=%d", k, len(outputs.features), len(outputs.features))
        k = len(outputs.features)
    means, precision = fit_gaussian(outputs.features, labels, n_classes)
    detector = OODDetector(model, tokenizer, layer, means, precision, l2_normalise(outputs.features), k,
                           temperature, batch_size)
    detector.seconds["fit"] = time.perf_counter() - start
    return detector


# -- the report ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OODReport:
    """Per scorer: metrics, in- and out-of-distribution scores, seconds (scoring both sets)."""

    metrics: dict[str, OODMetrics]
    in_scores: dict[str, np.ndarray]
    out_scores: dict[str, np.ndarray]
    seconds: dict[str, float]  # "forward" (both sets, shared by all scorers), "fit", then one per scorer

    def to_dict(self) -> dict[str, Any]:
        return {"metrics": {name: m.to_dict() for name, m in self.metrics.items()}, "seconds": self.seconds}


def ood_report(detector: OODDetector, in_inputs: Inputs, out_inputs: Inputs,
               scorers: Sequence[str] = SCORERS) -> OODReport:
    """AUROC / AUPR-In / AUPR-Out / FPR95 of each scorer, in-distribution `in_inputs` (held out from
    the fit) against `out_inputs`."""
    start = time.perf_counter()
    in_outputs = detector.outputs(in_inputs, "the in-distribution data")
    out_outputs = detector.outputs(out_inputs, "the out-of-distribution data")
    seconds = {"fit": detector.seconds.get("fit", float("nan")), "forward": time.perf_counter() - start}
    in_scores = detector.score_outputs(in_outputs, scorers)
    in_seconds = {name: detector.seconds[name] for name in scorers}
    out_scores = detector.score_outputs(out_outputs, scorers)
    seconds |= {name: in_seconds[name] + detector.seconds[name] for name in scorers}
    metrics = {name: ood_metrics(in_scores[name], out_scores[name]) for name in scorers}
    return OODReport(metrics, in_scores, out_scores, seconds)


def draw_report(report: OODReport, histogram_png: Path, roc_png: Path, title: str = "") -> None:
    """Score histograms (in vs out, one panel per scorer) and ROC curves, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tformer.files import write_figure_atomic

    names = list(report.metrics)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 2.8), dpi=100, squeeze=False)
    for ax, name in zip(axes[0], names):
        low, high = np.percentile(np.concatenate([report.in_scores[name], report.out_scores[name]]), [1, 99])
        edges = np.linspace(low, high, 41) if high > low else 40  # tails clipped into the end bins
        ax.hist(np.clip(report.in_scores[name], low, high), bins=edges, alpha=0.6, density=True, label="in")
        ax.hist(np.clip(report.out_scores[name], low, high), bins=edges, alpha=0.6, density=True, label="out")
        ax.set_title(f"{name} (AUROC {report.metrics[name].auroc:.3f})", fontsize=9)
        ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    write_figure_atomic(fig, histogram_png)

    fig, ax = plt.subplots(figsize=(4.2, 4), dpi=100)
    for name in names:
        fpr, tpr = roc_points(check_scores(report.in_scores[name], name), report.out_scores[name])
        ax.plot(fpr, tpr, label=f"{name} ({report.metrics[name].auroc:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linewidth=0.5, linestyle="--")
    ax.set_xlabel("false-positive rate (out accepted)")
    ax.set_ylabel("true-positive rate (in accepted)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    write_figure_atomic(fig, roc_png)


__all__ = ["DEFAULT_K", "MARKER", "OODDetector", "OODReport", "Outputs", "SCORERS", "batches", "check_classifier",
           "draw_report", "energy_score", "find_feature_layer", "fit", "fit_gaussian", "forward",
           "free_energy", "image_tensor", "knn_score", "l2_normalise", "mahalanobis_score", "msp_score",
           "ood_report", "prepare_folder", "text_rows"]

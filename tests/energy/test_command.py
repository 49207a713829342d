"""`tformer energy -- COMMAND`: any command (a benchmark, a peer's script) metered with its
children's CPU time, the record written as JSON; the command's exit code passed on."""

from __future__ import annotations

import json
import sys

from tformer.cli import main

BURN = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass"


def test_a_command_is_metered_with_its_children_and_its_exit_code_kept(tmp_path, capsys):
    out = tmp_path / "energy.json"
    assert main(["energy", "--out", str(out), "--", sys.executable, "-c", BURN]) == 0
    record = json.loads(out.read_text())
    assert record["exit_code"] == 0 and record["energy_method"] == "estimated"  # no RAPL in these VMs
    watts = float(record["energy_source"].split("@")[1].split("W")[0])
    assert record["energy_j"] >= 0.3 * watts * 0.9  # the child's 0.3 CPU-seconds are counted
    assert "exit 0" in capsys.readouterr().err
    assert main(["energy", "--", sys.executable, "-c", "raise SystemExit(3)"]) == 3


def test_bad_invocations_are_one_line(tmp_path, capsys):
    taken = tmp_path / "taken.json"
    taken.write_text("mine")
    assert main(["energy", "--out", str(taken), "--", sys.executable, "-c", "pass"]) == 2
    assert "already exists" in capsys.readouterr().err and taken.read_text() == "mine"
    assert main(["energy"]) == 2
    assert "no command to meter" in capsys.readouterr().err
    assert main(["energy", "--", "no-such-program-here"]) == 2
    assert "cannot run 'no-such-program-here'" in capsys.readouterr().err


def test_a_benchmark_says_its_energy_when_it_exits():
    """Every benchmark script calls say_at_exit first: one line on stderr at exit."""
    import subprocess

    code = f"from tformer.cli.energy_command import say_at_exit\nsay_at_exit('bench_x')\n{BURN}"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("energy of bench_x: energy ") and "estimated" in line and "g CO2e" in line
    assert done.stdout == ""

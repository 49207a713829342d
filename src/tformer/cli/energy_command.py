"""`tformer energy [--out FILE] -- COMMAND ...`: the energy and CO2e of any command (a benchmark,
a peer's training script), metered like tformer's own runs (RAPL / NVML where readable, else this
process's and its children's CPU time x a per-core figure, labelled estimated). `say_at_exit`: the
same line for a script about itself (every benchmark calls it first)."""

from __future__ import annotations

import argparse
import atexit
import json
import subprocess
import sys
import time
from pathlib import Path

from tformer.cli.arguments import energy_option


def add_energy_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("energy", help="run a command and say its energy and CO2e (e.g. a benchmark: "
                       "tformer energy -- python benchmarks/bench_gpt.py)")
    energy_option(p)
    p.add_argument("--out", default=None, help="also write the record as JSON to this new file")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="the command, after --")
    p.set_defaults(func=cmd_energy)


def cmd_energy(args: argparse.Namespace) -> int:
    from tformer.energy import EnergyMeter

    command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not command:
        raise ValueError("no command to meter: give it after --, e.g. tformer energy -- python benchmarks/bench_gpt.py")
    out = Path(args.out).expanduser() if args.out else None
    if out is not None and out.exists():
        raise ValueError(f"{out} already exists; give --out a new file name")
    meter, start = EnergyMeter.open(), time.monotonic()  # a child's CPU time counts once it has been waited for
    try:
        code = subprocess.call(command)
    except OSError as e:
        raise ValueError(f"cannot run {command[0]!r}: {e.strerror or e}") from None
    reading, seconds = meter.reading(), time.monotonic() - start
    print(f"{' '.join(command)}: exit {code}, {seconds:.1f} s, {reading.summary()}", file=sys.stderr)
    if out is not None:
        record = {"command": command, "exit_code": code, "seconds": seconds, **reading.fields()}
        out.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return code


def say_at_exit(what: str) -> None:
    """Meter this process from now on; when it exits, one line on stderr with its energy and
    CO2e (children it waited for included)."""
    from tformer.energy import EnergyMeter

    meter = EnergyMeter.open()
    atexit.register(lambda: print(f"energy of {what}: {meter.reading().summary()}", file=sys.stderr, flush=True))

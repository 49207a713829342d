"""PLACEHOLDER (being written): `tformer prune`."""

from __future__ import annotations

import argparse


def add_prune_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="(being written)")
    p.set_defaults(func=lambda args: (_ for _ in ()).throw(ValueError("tformer prune is being written")))

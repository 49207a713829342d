"""PLACEHOLDER (being written): `tformer quantize`."""

from __future__ import annotations

import argparse


def add_quantize_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="(being written)")
    p.set_defaults(func=lambda args: (_ for _ in ()).throw(ValueError("tformer quantize is being written")))

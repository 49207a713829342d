"""PLACEHOLDER (being written): `tformer adapter`."""

from __future__ import annotations

import argparse


def add_adapter_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("adapter", help="(being written)")
    p.set_defaults(func=lambda args: (_ for _ in ()).throw(ValueError("tformer adapter is being written")))

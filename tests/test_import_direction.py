"""Data flows one way: a package imports only packages to its left (DESIGN.md)."""

import ast
from pathlib import Path

import tformer

SRC = Path(tformer.__file__).parent
# config -> tokenizers -> data, metrics -> nn -> models -> inference -> training -> analysis, interop -> cli
# (data may use tokenizers; the Trainer's samples use inference)
RANK = {"config": 0, "files": 0, "tokenizers": 1, "data": 2, "metrics": 2, "nn": 3, "models": 4, "inference": 5,
        "training": 6, "analysis": 7, "interop": 7, "federated": 7, "cli": 8, "__main__": 9}


def package_of(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return parts[0]


def tformer_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tformer."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("tformer.")}
    return found


def test_every_package_has_a_rank():
    packages = {package_of(p) for p in SRC.rglob("*.py")} - {"__init__"}
    assert packages <= set(RANK), f"add {packages - set(RANK)} to RANK and DESIGN.md"


def test_imports_point_left():
    wrong = []
    for path in SRC.rglob("*.py"):
        package = package_of(path)
        if package == "__init__":
            continue
        for target in tformer_imports(path) - {package}:
            allowed = RANK[target] < RANK[package] and not (package == "nn")  # nn: torch only
            if not allowed:
                wrong.append(f"{path.relative_to(SRC)} imports tformer.{target}")
    assert not wrong, "imports against the data flow:\n" + "\n".join(wrong)

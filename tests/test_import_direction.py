"""Data flows one way: a package imports only packages to its left (DESIGN.md)."""

import ast
from pathlib import Path

import tformer

SRC = Path(tformer.__file__).parent
# config, files -> tokenizers -> data, metrics -> nn -> models -> runs -> inference, attacks -> training
#   -> analysis, compress, interop, federated, serve -> cli
# (data may use tokenizers; the Trainer's samples use inference; using a trained model goes through
# runs, never through training)
RANK = {"config": 0, "files": 0, "cpu": 0, "energy": 0, "tokenizers": 1, "data": 2, "metrics": 2, "nn": 3, "models": 4, "runs": 5,
        "inference": 6, "attacks": 6, "training": 7, "analysis": 8, "compress": 8, "interop": 8, "federated": 8, "serve": 8,
        "cli": 9, "__main__": 10}


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


def module_imports(path: Path, modules: set[str]) -> set[str]:
    """The tformer modules `path` imports (anywhere in it, TYPE_CHECKING blocks included):
    `from pkg import sub` is an edge to pkg.sub when that is a module, else to pkg."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tformer."):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("tformer.")}
    return found


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` (a list of nodes, first == last), or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(node: str, stack: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt, stack + [nxt])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_no_cycles_between_modules_of_one_package():
    """Inside a package too, imports form no cycle (e.g. recipe -> tasks -> a task -> recipe)."""
    modules = {module_name(p): p for p in SRC.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name.split(".")[1] if "." in name else name
        graph[name] = {m for m in module_imports(path, set(modules)) if m in modules and m != name
                       and "." in m and m.split(".")[1] == package}
    assert find_cycle(graph) is None, "import cycle: " + " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None

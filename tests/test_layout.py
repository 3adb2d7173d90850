"""The package's shape: imports go one way (no circle, none hidden in a function to dodge one), and the Optuna
plugin, which Hydra imports in every app of the environment, imports nothing of digit_lightning when discovered."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "digit_lightning"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Every module of the package -> the package modules it imports, at the top level or inside a function."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
                names = [f"{base}.{alias.name}" for alias in node.names]
                targets = [name if name in modules else base for name in names]
            else:
                continue
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle, as the list of modules around it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_import_graph_has_no_circle():
    graph = import_graph()
    assert graph["digit_lightning.train"] >= {"digit_lightning.runs"}  # the graph sees real imports
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_find_cycle_finds_one():  # the check above can fail
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_ground_floor_imports_nothing_above_it():
    graph = import_graph()
    assert graph["digit_lightning.errors"] == set()
    assert graph["digit_lightning.rank"] == set()
    assert graph["digit_lightning"] == set()
    below_cli = [m for m, deps in graph.items() if "digit_lightning.cli" in deps]
    entry_points = {"train", "eval", "predict", "export", "serve", "sweep_report", "data.__main__"}
    assert {m.removeprefix("digit_lightning.") for m in below_cli} <= entry_points, below_cli


def test_discovering_the_optuna_plugin_imports_nothing_of_the_package():
    code = (
        "import sys\n"
        "from hydra.core.plugins import Plugins\n"
        "from hydra.plugins.sweeper import Sweeper\n"
        "from omegaconf import OmegaConf\n"
        "names = [p.__name__ for p in Plugins.instance().discover(Sweeper)]\n"
        "assert 'OptunaSweeper' in names, names\n"
        "leaked = sorted(m for m in sys.modules if m.split('.')[0] == 'digit_lightning')\n"
        "assert not leaked, leaked\n"
        "assert not OmegaConf.has_resolver('launch_time')\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


PRIVATE = re.compile(r"(?<![\w.])(?!self\.|cls\.)([A-Za-z_][\w\]\)]*(?:\.[A-Za-z]\w*)*)\._[a-z]\w*(?<!_)\b")


def private_uses(text: str) -> list[str]:
    """`obj._name` accesses on objects other than self/cls (Hydra's `_target_`-style keys end in `_`: not private)."""
    return [m.group(0) for m in PRIVATE.finditer(text)]


def test_private_attributes_of_other_libraries_only_in_the_compat_module():
    assert private_uses("x = scheduler._schedule_phases[0]; self._mine; cfg._target_") == ["scheduler._schedule_phases"]
    found = {
        str(path.relative_to(ROOT)): uses
        for path in [*PACKAGE.rglob("*.py"), *(ROOT / "hydra_plugins").rglob("*.py")]
        if path.name != "lightning_compat.py" and (uses := private_uses(path.read_text()))
    }
    assert not found, f"private attributes outside digit_lightning/lightning_compat.py: {found}"

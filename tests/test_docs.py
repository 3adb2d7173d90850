"""The documentation matches the code: docstrings everywhere public, CONTRIBUTING's layout and examples are true."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import digit_lightning

ROOT = Path(__file__).resolve().parent.parent
CONTRIBUTING = (ROOT / "CONTRIBUTING.md").read_text()
MODULES = sorted(
    m.name.removeprefix("digit_lightning.") for m in pkgutil.walk_packages(digit_lightning.__path__, "digit_lightning.")
)


def source_of(module_name: str) -> ast.Module:
    """The parsed source of `digit_lightning.<module_name>`, found as an import would find it, without importing it
    (some modules import MLflow or FastAPI: seconds)."""
    spec = importlib.util.find_spec(f"digit_lightning.{module_name}")
    return ast.parse(Path(spec.origin).read_text(encoding="utf-8"))


def public_objects(tree: ast.Module) -> list[tuple[str, ast.AST]]:
    """Public classes and functions a module's source defines (inside its top-level `if`, `try` and `with` blocks too),
    and the public methods their classes define."""
    defs = (ast.FunctionDef, ast.AsyncFunctionDef)
    found, stack = [], list(tree.body)
    while stack:
        node = stack.pop(0)
        if isinstance(node, (ast.If, ast.Try, ast.With)):
            handlers = [s for h in getattr(node, "handlers", []) for s in h.body]
            stack[:0] = [*node.body, *getattr(node, "orelse", []), *handlers, *getattr(node, "finalbody", [])]
        elif isinstance(node, (*defs, ast.ClassDef)) and not node.name.startswith("_"):
            found.append((node.name, node))
            if isinstance(node, ast.ClassDef):
                methods = [f for f in node.body if isinstance(f, defs) and not f.name.startswith("_")]
                found += [(f"{node.name}.{f.name}", f) for f in methods]
    return found


@pytest.mark.parametrize("module_name", MODULES)
def test_public_names_have_docstrings(module_name: str):
    tree = source_of(module_name)
    assert (ast.get_docstring(tree) or "").strip(), f"digit_lightning.{module_name} has no module docstring"
    # The definition's own docstring: an inherited one (Lightning's hook docs) does not say what ours does.
    missing = [name for name, node in public_objects(tree) if not (ast.get_docstring(node) or "").strip()]
    assert not missing, f"digit_lightning.{module_name}: no docstring on {', '.join(missing)}"


def test_the_docstring_walk_finds_things():
    """Guard against a walk that checks nothing: it must see the package's well-known names."""
    assert "MNISTDataModule.setup" in dict(public_objects(source_of("data.datamodule")))
    assert "load_checkpoint" in dict(public_objects(source_of("checkpoint")))
    assert "DigitClassifier.configure_optimizers" in dict(public_objects(source_of("module")))
    assert "Path" not in dict(public_objects(source_of("data.mnist")))  # imported, not defined there
    assert "AnnouncingServer.startup" in dict(public_objects(source_of("serve")))  # a method of an async server
    assert "data.datamodule" in MODULES and "callbacks.guards" in MODULES  # the walk goes into subpackages


def test_contributing_layout_names_every_module():
    layout = CONTRIBUTING.split("## Layout", 1)[1].split("\n## ", 1)[0]
    listed, package = set(), ""
    for line in layout.splitlines():
        if m := re.match(r"^  (\w+)/\s*$", line):
            package = m.group(1) + "."
        elif m := re.match(r"^(  |    )(\w+)\.py\s", line):
            name = m.group(2)
            if m.group(1) == "  ":
                package = ""
            listed.add(package.rstrip(".") if name == "__init__" else package + name)
    listed.discard("")
    missing, extra = set(MODULES) - listed, listed - set(MODULES)
    assert not missing and not extra, f"CONTRIBUTING.md layout: add {missing}, remove {extra}"


def test_contributing_logger_example_is_the_real_file():
    example = re.search(r"`conf/logger/many.yaml`:\s*```yaml\n(.*?)```", CONTRIBUTING, flags=re.DOTALL)
    assert example, "CONTRIBUTING.md no longer shows conf/logger/many.yaml"
    assert example.group(1) == (ROOT / "conf/logger/many.yaml").read_text()


def code_block(language: str, first_line: str) -> str:
    """The fenced block of `language` in CONTRIBUTING.md whose first line starts with `first_line`."""
    for block in re.findall(rf"```{language}\n(.*?)```", CONTRIBUTING, flags=re.DOTALL):
        if block.startswith(first_line):
            return block
    raise AssertionError(f"CONTRIBUTING.md has no {language} block starting with {first_line!r}")


@pytest.mark.slow  # a copy of the package and a CLI start
def test_contributing_model_example_trains(run_cli, tmp_path: Path):
    """Add the *Add a model* net and its config to a copy of the package (nothing else: the module registers itself),
    and train it for one batch through the CLI (run from the copy's directory, so that `python -m` imports the copy)."""
    import shutil

    shutil.copytree(
        ROOT / "digit_lightning", tmp_path / "digit_lightning", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    (tmp_path / "digit_lightning" / "models" / "wide.py").write_text(
        code_block("python", "# digit_lightning/models/wide.py")
    )
    (tmp_path / "conf" / "model" / "wide.yaml").write_text(code_block("yaml", "# conf/model/wide.yaml"))

    result = run_cli("digit_lightning.train", "model=wide", "model.net.width=32", "debug=fdr",
                     "callbacks.progress_bar=null", "extras.print_config=true", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "name: wide" in result.stdout and "width: 32" in result.stdout
    assert "test/acc" in result.stderr + result.stdout


HEAVY = ("torch", "lightning")


# Each `--help` of every entry point, in one fresh interpreter (a process start costs seconds): after each one,
# none of HEAVY (torch, Lightning) may be imported yet. `-m` is run as runpy runs it; the last is what the `digit-eval`
# console script runs (`from digit_lightning.eval import main`, with argv[0] its name).
HYDRA_APPS = ("train", "eval", "predict", "export", "serve")
HELP_COMMANDS = [
    *([f"digit_lightning.{m}", "--help"] for m in (*HYDRA_APPS, "data", "sweep_report")),
    ["digit_lightning.train", "--hydra-help"],
    ["digit-eval", "--help"],
]
HELP_PROBE = """
import contextlib, io, json, runpy, sys
from hydra.core.global_hydra import GlobalHydra
results = []
heavy_modules = set(json.loads(sys.argv[2]))
for command in json.loads(sys.argv[1]):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            if command[0] == "digit-eval":
                sys.argv = command
                from digit_lightning.eval import main
                main()
            else:
                sys.argv = [command[0], *command[1:]]
                runpy.run_module(command[0], run_name="__main__", alter_sys=True)
            code = None
        except SystemExit as exit:
            code = exit.code
    GlobalHydra.instance().clear()
    heavy = sorted(heavy_modules & set(sys.modules))
    results.append({"command": command, "code": code, "out": out.getvalue(), "heavy": heavy})
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def helps(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, dict], Path]:
    """HELP_COMMANDS' answers by command line (its exit code, output and the HEAVY modules imported by then), and
    the dir they ran in."""
    cwd = tmp_path_factory.mktemp("help")
    probe = [sys.executable, "-c", HELP_PROBE, json.dumps(HELP_COMMANDS), json.dumps(HEAVY)]
    done = subprocess.run(probe, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.splitlines()[-1])
    assert [r["command"] for r in results] == HELP_COMMANDS
    return {" ".join(r["command"]): r for r in results}, cwd


@pytest.mark.slow  # the fresh-interpreter probe: Hydra's --help alone takes ~1 s an app
def test_help_answers_before_importing_torch_or_lightning(helps):
    """`--help` is text: it must not wait seconds for torch and Lightning to import, nor write anything."""
    answers, cwd = helps
    for r in answers.values():
        assert r["code"] in (0, None), r
        assert "python -m digit_lightning." in r["out"].splitlines()[0] or "Hydra" in r["out"], r
        assert r["heavy"] == [], r  # cumulative: the first command to import torch is the one named
    assert list(cwd.iterdir()) == []


@pytest.mark.slow  # the fresh-interpreter probe: Hydra's --help alone takes ~1 s an app
@pytest.mark.parametrize("module", HYDRA_APPS)
def test_hydra_entry_points_describe_themselves(module: str, helps):
    """`--help` says what the command does, shows only its own groups and one example."""
    text = helps[0][f"digit_lightning.{module} --help"]["out"]
    assert text.startswith(f"python -m digit_lightning.{module}"), text
    assert "Example" in text and f"python -m digit_lightning.{module} " in text.split("Example")[1]
    assert ("hparams_search" in text) == (module == "train")  # training's groups only where they apply


@pytest.mark.slow  # the fresh-interpreter probe: Hydra's --help alone takes ~1 s an app
@pytest.mark.parametrize("module", ["data", "sweep_report"])
def test_help_prints_usage(module: str, helps):
    """`--help` on the argparse-free entry points is usage, not a data dir or a multirun dir to work on (the probe's
    dir stays empty)."""
    assert helps[0][f"digit_lightning.{module} --help"]["out"].startswith(f"usage: python -m digit_lightning.{module}")


def test_help_guard_leaves_a_library_import_alone_in_process(monkeypatch: pytest.MonkeyPatch):
    """A program of one's own whose arguments include --help imports an entry module: it imports, help unanswered."""
    monkeypatch.setattr(sys, "argv", ["mine.py", "--help"])
    monkeypatch.delitem(sys.modules, "digit_lightning.eval", raising=False)  # restored after the test
    module = importlib.import_module("digit_lightning.eval")  # runs the module's top level, its guard included
    assert module.ClassMetrics.__name__ == "ClassMetrics"


@pytest.mark.slow  # the fresh-interpreter twin of the test above
def test_help_guard_leaves_a_library_import_alone():
    """Importing an entry module from a program whose own arguments include --help imports it, help unanswered."""
    code = "import sys; sys.argv = ['mine.py', '--help']; import digit_lightning.eval as e; print(e.ClassMetrics)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("<class"), result.stdout + result.stderr[-2000:]


@pytest.mark.slow  # the CLI twin of the in-process test above
def test_train_help_through_the_real_cli(tmp_path: Path):
    result = subprocess.run([sys.executable, "-m", "digit_lightning.train", "--help"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0 and result.stdout.startswith("python -m digit_lightning.train"), result.stderr
    assert list(tmp_path.iterdir()) == []

"""The documentation matches the code: docstrings everywhere public, CONTRIBUTING's layout and examples are true."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import digit_lightning

ROOT = Path(__file__).resolve().parent.parent
CONTRIBUTING = (ROOT / "CONTRIBUTING.md").read_text()
MODULES = sorted(m.name for m in pkgutil.iter_modules(digit_lightning.__path__))


def public_objects(module) -> list[tuple[str, object]]:
    """Public classes and functions defined in `module`, and the public methods their classes define."""
    found = []
    for name, obj in vars(module).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(obj):
            found.append((name, obj))
        elif inspect.isclass(obj):
            found.append((name, obj))
            for attr, member in vars(obj).items():
                func = member.__func__ if isinstance(member, (classmethod, staticmethod)) else member
                if not attr.startswith("_") and inspect.isfunction(func):
                    found.append((f"{name}.{attr}", func))
    return found


@pytest.mark.parametrize("module_name", MODULES)
def test_public_names_have_docstrings(module_name: str):
    module = importlib.import_module(f"digit_lightning.{module_name}")
    assert (module.__doc__ or "").strip(), f"digit_lightning/{module_name}.py has no module docstring"
    # obj.__doc__, not inspect.getdoc: an inherited docstring (Lightning's hook docs) does not say what ours does.
    missing = [name for name, obj in public_objects(module) if not (obj.__doc__ or "").strip()]
    assert not missing, f"digit_lightning/{module_name}.py: no docstring on {', '.join(missing)}"


def test_the_docstring_walk_finds_things():
    """Guard against a walk that checks nothing: it must see the package's well-known names."""
    from digit_lightning import checkpoint, data, module

    assert "MNISTDataModule.setup" in dict(public_objects(data))
    assert "load_checkpoint" in dict(public_objects(checkpoint))
    assert "DigitClassifier.load_from_checkpoint" in dict(public_objects(module))
    assert "Path" not in dict(public_objects(data))  # imported, not defined there


def test_contributing_layout_names_every_module():
    layout = CONTRIBUTING.split("## Layout", 1)[1].split("##", 1)[0]
    listed = set(re.findall(r"^\s+(\w+)\.py\s", layout, flags=re.MULTILINE)) - {"__init__"}
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


def test_contributing_model_example_trains(run_cli, tmp_path: Path):
    """Write the *Add a model* net and config where the text says, and train it for one batch through the CLI."""
    net = code_block("python", "# my_nets/wide.py")
    config = code_block("yaml", "# conf/model/wide.yaml")
    (tmp_path / "my_nets").mkdir()
    (tmp_path / "my_nets" / "wide.py").write_text(net)
    (tmp_path / "configs" / "model").mkdir(parents=True)
    (tmp_path / "configs" / "model" / "wide.yaml").write_text(config)

    result = run_cli(
        "digit_lightning.train", "model=wide", "model.net.width=32", "debug=fdr", "callbacks.progress_bar=null",
        f"hydra.searchpath=[file://{tmp_path / 'configs'}]", "paths.log_dir=logs",
        cwd=tmp_path,  # my_nets is importable from here: `python -m` puts the working directory on sys.path
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "_target_: my_nets.wide.WideNet" in result.stdout and "width: 32" in result.stdout
    assert "test/acc" in result.stderr + result.stdout


@pytest.mark.parametrize("module", ["data", "sweep_report"])
def test_help_prints_usage_and_touches_nothing(module: str, tmp_path: Path):
    """`--help` on the argparse-free entry points is usage, not a data dir or a multirun dir to work on."""
    result = subprocess.run(
        [sys.executable, "-m", f"digit_lightning.{module}", "--help"], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 0 and result.stdout.startswith("usage: python -m digit_lightning."), result.stderr
    assert list(tmp_path.iterdir()) == []

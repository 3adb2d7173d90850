"""The README, the docs and the code agree: every command in their bash blocks composes, the quick ones run for real.

Each `python -m digit_lightning.<name>` (or `.venv/bin/python -m ...`) line of a ```bash block of README.md or
docs/*.md is run as a
subprocess in a scratch project dir where the README's example paths exist (a small real checkpoint at
`logs/train/runs/2026-11-27_03-35-55/checkpoints/last.ckpt`, a real tiny multirun, `scans/`, `my_digit.jpg`):

- training commands (sweeps and searches too) run for real on the CPU, with tiny limits appended for each limit the
  command does not set itself (2 training batches, 1 epoch, 2 Optuna trials): they must exit 0;
- those that need a GPU or a cluster run with `--cfg job`: that proves the groups, options and keys on the line
  compose (a sweep's `-m` is dropped and `a=1,2` becomes `a=1`, since Hydra's `--cfg` prints a single job);
- predict, export, eval, data, sweep_report, `--help` and `debug=fdr` lines run fully and must exit 0;
- `make <target>` lines are dry-run (`make -n`), which checks that the targets exist;
- torchrun lines are skipped: they need several GPU nodes; every other line of a bash block is either one of the
  above or listed in SKIPPED with its reason (`test_every_documented_command_is_checked_or_skipped_with_a_reason`).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from PIL import Image

from digit_lightning.cli import compose_config
from digit_lightning.predict import predict

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
DOCS = {p.name: p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))}
ENTRY = re.compile(r"^(?:\.venv/bin/)?python -m digit_lightning\.(\w+)\b")
RUN_DIR = "logs/train/runs/2026-11-27_03-35-55"  # the run dir the README's examples name
SWEEP_DIR = "logs/lr_bs/multiruns/2026-11-27_04-00-00"
RUN_FULLY = {"predict", "export", "eval", "data", "sweep_report"}  # each takes seconds on the small checkpoint


def bash_lines(sections: tuple[str, ...] = (), text: str = README) -> list[str]:
    """Every line of `text`'s ```bash blocks (only in `sections`, if given), continuation lines joined, prompts
    (`$ `) removed."""
    lines = []
    for section in re.split(r"\n(?=## )", text):
        if sections and section.splitlines()[0].removeprefix("## ") not in sections:
            continue
        for block in re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.strip()
                lines.append(line[2:] if line.startswith("$ ") else line)
    return lines


def unique(commands: list[str]) -> list[str]:
    """The commands without repeats (the same words, with `python` or `.venv/bin/python`, comments aside)."""
    seen, kept = set(), []
    for command in commands:
        words = tuple(shlex.split(command.removeprefix(".venv/bin/"), comments=True))
        if words not in seen:
            seen.add(words)
            kept.append(command)
    return kept


ALL_LINES = bash_lines() + [line for text in DOCS.values() for line in bash_lines(text=text)]
COMMANDS = unique([c for c in ALL_LINES if ENTRY.match(c) or c.startswith(("make ", "torchrun ", "sbatch "))])
# Each command runs as its own `python -m` (seconds of imports), so only with `-m slow`; the fast suite dry-runs the
# make lines and runs what a newcomer types first in process (test_quick_start_predicts_in_process).
FIRST_STEPS = set(bash_lines(("Quick start",)))
ASSIGNMENTS = [c for c in bash_lines() if re.match(r"^[A-Z_]+=\$\(", c)]  # e.g. CKPT=$(ls -t ...)


def test_readme_has_commands_to_check():
    entry_points = {ENTRY.match(c).group(1) for c in COMMANDS if ENTRY.match(c)}
    assert {"train", "eval", "predict", "export", "sweep_report"} <= entry_points
    assert any(c.startswith("make train") for c in COMMANDS) and any(c.startswith("make test") for c in COMMANDS)


def expand(token: str, env: dict[str, str]) -> str:
    """`$NAME` / `${NAME}` replaced as the shell would (the README only uses unquoted or single-word variables)."""
    return re.sub(r"\$\{?(\w+)\}?", lambda m: env[m.group(1)], token)


def only_first_job(args: list[str]) -> list[str]:
    """A multirun's arguments as one job's: no `-m`, and `key=a,b` sweeps reduced to `key=a`."""
    single = []
    for arg in args:
        if arg in ("-m", "--multirun"):
            continue
        key, eq, value = arg.partition("=")
        if eq and "," in value and not re.search(r"[\[\](){}]", value):
            arg = f"{key}={value.split(',')[0]}"
        single.append(arg)
    return single


@pytest.fixture(scope="module")
def project(small_checkpoint, mnist_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A scratch dir where the README's example paths exist, and the environment its commands run with."""
    root = tmp_path_factory.mktemp("readme_project")
    shutil.copytree(ROOT / "docs" / "examples", root / "docs" / "examples")
    ckpt, _ = small_checkpoint
    run = root / RUN_DIR
    (run / "checkpoints").mkdir(parents=True)
    for name in ("last.ckpt", "epoch_004.ckpt"):
        shutil.copy(ckpt, run / "checkpoints" / name)
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(compose_config(["trainer=cpu"])))
    other_task = root / "logs/lr_bs/runs/2026-11-27_04-10-00/checkpoints"  # for `ckpt_path=last task_name=lr_bs`
    other_task.mkdir(parents=True)
    shutil.copy(ckpt, other_task / "last.ckpt")
    for name in ("a", "b", "c"):  # the ensemble example's members
        shutil.copy(ckpt, root / f"{name}.ckpt")
    (root / "scans").mkdir()
    shutil.copy(ROOT / "docs/examples/two.jpg", root / "scans" / "two.jpg")
    Image.open(ROOT / "docs/examples/seven.png").convert("RGB").save(root / "my_digit.jpg")

    env = {**os.environ, "DIGIT_LIGHTNING_DATA": str(mnist_dir), "PYTHONUNBUFFERED": "1"}
    env["CKPT"] = f"{RUN_DIR}/checkpoints/last.ckpt"
    for line in ASSIGNMENTS:  # the README's own way of finding a checkpoint must find ours
        name = line.split("=", 1)[0]
        value = subprocess.run(["bash", "-c", f"{line}\necho ${name}"], cwd=root, capture_output=True, text=True)
        assert value.stdout.strip(), f"`{line}` found nothing: {value.stderr}"
        env[name] = value.stdout.strip()
    return root, env


@pytest.fixture(scope="module")
def project_with_sweep(project: tuple[Path, dict]) -> tuple[Path, dict]:
    """The project with the README's example sweep dir: a real two-job multirun (for the commands that name it)."""
    root, env = project
    sweep = subprocess.run(
        [sys.executable, "-m", "digit_lightning.train", "-m", "model.optimizer.lr=1e-3,3e-4", "debug=fdr",
         "callbacks.progress_bar=null", f"hydra.sweep.dir={SWEEP_DIR}"],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    return project


# What a documented training command gets appended, for each key it does not set itself: a real run in seconds.
TINY = {"+trainer.limit_train_batches": "2", "+trainer.limit_val_batches": "1", "+trainer.limit_test_batches": "1",
        "trainer.max_epochs": "1", "trainer.log_every_n_steps": "1", "callbacks.progress_bar": "null",
        "hydra.sweeper.n_trials": "2"}  # fmt: skip
NEEDS = {
    "trainer=gpu": "a GPU",
    "trainer=ddp": "GPUs",
    "hydra/launcher=slurm": "a SLURM cluster",
    "trainer=ddp_sim": "two processes (tests/test_scale.py runs them)",
}  # an argument -> what it needs
NEEDS_IN_TEXT = {"mysql+pymysql://": "a database server", "postgresql://": "a database server",
                 "/shared/": "a shared file system"}  # fmt: skip
# Lines of a bash block that are not entry-point, make, torchrun or sbatch commands: why each is not run here.
SKIPPED = {
    r"^for seed in .*experiment=record": "the record recipe: 30-epoch runs, hours on a CPU (its settings compose: "
    "the `experiment=record` line of the same page is checked)",
    r"^for seed in .*bench/models\.py run": "the record recipe's measured runs (bench/models.py has tests of its own)",
    r"^(\.venv/bin/)?python bench/bench\.py": "`make bench`: tens of minutes of timing (the dry run of `make bench`)",
    r"^optuna-dashboard ": "a web server that runs until stopped (tests/test_optuna.py checks the study it reads)",
    r"^mlflow ui ": "a web server that runs until stopped (tests/test_tracking.py reads the same store)",
    r"^wandb (login|sync)\b": "needs a W&B account and the network (tests/test_tracking.py reads the offline run)",
    r"^curl .*127\.0\.0\.1:8000/": "needs `make serve` running (tests/test_serve.py sends them to a real server)",
    r"^apt-get install chromium": "a system package: .ci/run installs it",
    r"^python docs/screenshots\.py": "tests/test_many_runs.py makes the same runs and renders the same pages",
}


def _tiny(args: list[str]) -> list[str]:
    """`args` with TINY's settings appended for each key they do not set (a `+key` counts as the key)."""
    keys = {a.split("=", 1)[0].lstrip("+~") for a in args if "=" in a}
    optuna = any(a.startswith("hparams_search=") for a in args)
    return [*args, *(f"{k}={v}" for k, v in TINY.items()
                     if k.lstrip("+") not in keys and (optuna or not k.startswith("hydra.sweeper")))]  # fmt: skip


def plan(command: str) -> tuple[str, list[str] | None, str]:
    """How to check `command`: ("run" | "cfg" | "make" | "skip", argv or None, reason)."""
    if command.startswith(("torchrun ", "sbatch ")):
        return "skip", None, "torchrun and sbatch have tests of their own (tests/test_slurm.py)"
    if "$(" in command:
        return "skip", None, "it lists the checkpoints of an earlier long run (the record recipe)"
    if command.startswith("make "):
        return "make", shlex.split(command, comments=True)[1:], "dry run"
    tokens = shlex.split(command, comments=True)
    module = ENTRY.match(command).group(1)
    args = tokens[3:]
    if module in RUN_FULLY or "--help" in args or "debug=fdr" in args:
        return "run", [module, *args], "runs in seconds"
    needs = [why for arg, why in NEEDS.items() if arg in args]
    needs += [why for text, why in NEEDS_IN_TEXT.items() if text in command]
    if any(a.startswith("ckpt_path=") for a in args):  # tiny limits would change the run's planned schedule
        needs.append("the example run's own length (tests/test_resume.py resumes and extends real runs)")
    if module == "train" and not needs:
        return "run", [module, *_tiny(args)], "trains on tiny slices"
    return "cfg", [module, *only_first_job(args), "--cfg", "job"], f"needs {', '.join(needs) or 'a long run'}"


def param(command: str, index: int):
    """The command as a test case, marked slow unless it is a `make -n` dry run."""
    slow = plan(command)[0] != "make"
    return pytest.param(command, id=f"{index:02d}", marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize("command", [param(c, i) for i, c in enumerate(COMMANDS)])
def test_readme_command(command: str, request: pytest.FixtureRequest):
    how, args, reason = plan(command)
    if how == "skip":
        pytest.skip(f"{reason}: {command}")
    if how == "make":
        if shutil.which("make") is None:
            pytest.skip("make is not installed")
        argv, cwd, env = ["make", "-n", *args], ROOT, None  # -n: print the recipe, run nothing
    else:
        root, env = request.getfixturevalue("project_with_sweep" if SWEEP_DIR in command else "project")
        argv, cwd = [sys.executable, "-m", f"digit_lightning.{args[0]}", *(expand(a, env) for a in args[1:])], root
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{how}: {' '.join(argv)}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    if how == "cfg":
        assert "_target_" in result.stdout or "ckpt_path" in result.stdout, result.stdout[-2000:]


def test_quick_start_predicts_in_process(project, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    """The Quick start's `predict` lines (after `make train`), each in this process as its CLI runs it: the same
    composed config, the same `predict()`; test_readme_command runs them as commands with `-m slow`."""
    root, _ = project
    commands = [c for c in FIRST_STEPS if ENTRY.match(c)]
    assert commands and all(ENTRY.match(c).group(1) == "predict" for c in commands), commands  # else: a twin here
    monkeypatch.chdir(root)  # ckpt_path=last and the inputs are relative to where the user types them
    for command in commands:
        args = shlex.split(command, comments=True)[3:]
        assert predict(compose_config(args, config_name="predict")) == 0, capsys.readouterr().err
        out = capsys.readouterr().out
        inputs = [a.removeprefix("inputs=[").removesuffix("]") for a in args if a.startswith("inputs=")]
        names = [Path(i).name for listed in inputs for i in listed.split(",")]
        assert names and all(name in out for name in names), out


def test_every_documented_command_is_checked_or_skipped_with_a_reason():
    """A line of a bash block is a command this file checks (COMMANDS, perhaps a repeat of one), or SKIPPED says why
    not: a new kind of command in the docs fails here until it is run or skipped on purpose."""
    checked = {tuple(shlex.split(c.removeprefix(".venv/bin/"), comments=True)) for c in COMMANDS}
    unplanned = []
    for line in ALL_LINES:
        words = tuple(shlex.split(line.removeprefix(".venv/bin/"), comments=True)) if line else ()
        if not words or words in checked or line in ASSIGNMENTS or re.match(r"^[A-Z_]+=", line):
            continue
        if not any(re.search(pattern, line) for pattern in SKIPPED):
            unplanned.append(line)
    assert not unplanned, f"documented commands neither checked nor skipped with a reason: {unplanned}"
    reasons = {plan(c)[2] for c in COMMANDS if plan(c)[0] == "skip"} | set(SKIPPED.values())
    assert all(len(r) > 20 for r in reasons), reasons


def test_documented_training_commands_run_on_tiny_slices():
    """Commands that train run for real (tiny limits appended where the command sets none); the command's own
    values win, so that a documented value that fails (a limit below one batch) fails here."""
    assert plan("python -m digit_lightning.train experiment=fast")[:2] == (
        "run", ["train", "experiment=fast", *(f"{k}={v}" for k, v in TINY.items() if "sweeper" not in k)]
    )  # fmt: skip
    how, args, _ = plan("python -m digit_lightning.train hparams_search=mnist_optuna +trainer.limit_val_batches=0.1")
    assert how == "run" and "+trainer.limit_val_batches=0.1" in args and "hydra.sweeper.n_trials=2" in args
    assert not [a for a in args if a.startswith("+trainer.limit_val_batches=1")]
    assert plan("python -m digit_lightning.train trainer=gpu")[0] == "cfg"


def test_readme_is_short_and_links_to_docs_that_exist():
    assert len(README.splitlines()) <= 250
    for link in re.findall(r"\]\((docs/[^)#]+|CONTRIBUTING.md|LICENSE)[)#]", README):
        assert (ROOT / link).is_file(), f"README links to {link}, which does not exist"


def test_config_table_lists_every_option():
    """Every option file of every config group appears in docs/configuration.md's table."""
    table = DOCS["configuration.md"].split("# Configuration", 1)[1].split("\n## ", 1)[0]
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `([\w/]+)` \| (.*?) \|", table, flags=re.MULTILINE)}
    conf = ROOT / "conf"
    groups = [p.relative_to(conf).as_posix() for p in conf.rglob("*") if p.is_dir() and any(p.glob("*.yaml"))]
    assert "trainer" in groups and "hydra/launcher" in groups
    for group in groups:
        if group in ("hydra", "hydra/help"):  # the run-dir layout and each entry point's --help: not choices
            continue
        assert group in rows, f"docs/configuration.md's table has no row for the group `{group}`"
        for option in sorted(p.stem for p in (conf / group).glob("*.yaml")):
            assert f"`{option}`" in rows[group], f"docs/configuration.md: `{group}` does not list the option `{option}`"


def test_readme_images_exist():
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", README) + re.findall(r'<img src="([^"]+)"', README)
    assert any("docs/images/" in i for i in images), "the README shows no figure made by the project"
    for image in images:
        path = ROOT / image
        assert path.is_file(), f"README shows {image}, which does not exist"
        with Image.open(path) as opened:
            opened.verify()  # a real image file, not a placeholder


def test_make_figures_from_a_run(small_checkpoint, tmp_path: Path):
    """docs/make_figures.py extracts the dashboard images from a real run's TensorBoard event file."""
    ckpt, _ = small_checkpoint
    result = subprocess.run(
        [sys.executable, str(ROOT / "docs/make_figures.py"), "--run", str(ckpt.parent.parent), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("samples.png", "confusion_matrix.png", "misclassified.png"):
        image = Image.open(tmp_path / name)
        assert image.format == "PNG" and image.width > 300 and image.height >= 150, image.size

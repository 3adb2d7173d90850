"""The speed settings (CPU threads, evaluation batch size, compile mode, a lean start-up) and the benchmark scripts."""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from digit_lightning.cli import compose_config
from digit_lightning.data import MNISTDataModule
from digit_lightning.models import ModelError
from digit_lightning.module import DigitClassifier, compile_mode
from digit_lightning.train import set_cpu_threads

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_cpu_threads_auto_is_this_processs_share_of_its_cores(restore_threads, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0))
    set_cpu_threads("auto", processes=1)
    assert torch.get_num_threads() == cores
    set_cpu_threads("auto", processes=2)  # two DDP processes on this machine
    assert torch.get_num_threads() == max(1, cores // 2)
    set_cpu_threads(3, processes=1)
    assert torch.get_num_threads() == 3
    set_cpu_threads(None, processes=1)  # null: left as it is
    assert torch.get_num_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    set_cpu_threads("auto", processes=1)  # the user's OMP_NUM_THREADS wins over auto
    assert torch.get_num_threads() == 3
    assert compose_config(["paths.output_dir=/tmp/x"]).cpu_threads == "auto"


def adam_moment_after_silence() -> float:
    """Adam's first moment of a weight that got one gradient and then 900 zero ones: 1e-3 * 0.9**900 ~ 1e-44, a
    denormal number, unless the CPU flushes denormals to zero."""
    weight = torch.zeros(4, requires_grad=True)
    optimizer = torch.optim.Adam([weight], fused=True)
    for step in range(901):
        weight.grad = torch.full_like(weight, 1e-3 if step == 0 else 0.0)
        optimizer.step()
    return float(optimizer.state[weight]["exp_avg"][0])


@pytest.fixture
def no_flush_denormal():
    torch.set_flush_denormal(False)  # torch's default (an earlier train() in this process may have set it)
    yield
    torch.set_flush_denormal(False)


def test_flush_denormal_is_set_by_train(synthetic_cfg, no_flush_denormal):
    """`flush_denormal` (default true) makes a run compute numbers below 1.2e-38 as zero on the CPU, where Adam's
    moments of silent units would otherwise decay into slow denormal arithmetic; `false` keeps IEEE denormals."""
    from digit_lightning.train import train

    assert 0.0 < adam_moment_after_silence() < 1.2e-38  # torch's default: a denormal
    assert compose_config(["paths.output_dir=/tmp/x"]).flush_denormal is True
    train(synthetic_cfg("debug=fdr"))
    assert adam_moment_after_silence() == 0.0
    train(synthetic_cfg("debug=fdr", "flush_denormal=false"))
    assert adam_moment_after_silence() > 0.0


def test_validation_and_test_batches_are_eval_batch_size(mnist_dir: Path):
    dm = MNISTDataModule(data_dir=str(mnist_dir), batch_size=16, eval_batch_size=1000)
    dm.setup("fit")
    assert [len(y) for _, y in dm.val_dataloader()] == [1000] * 5
    assert len(next(iter(dm.train_dataloader()))[1]) == 16
    assert len(next(iter(dm.test_dataloader()))[1]) == 1000
    assert MNISTDataModule(batch_size=16).eval_batch_size == 16  # null: the training batch size
    assert compose_config(["paths.output_dir=/tmp/x"]).data.eval_batch_size == 1000


def test_compile_uses_cuda_graphs_only_on_a_gpu():
    assert compile_mode(torch.device("cuda", 0)) == "reduce-overhead"
    assert compile_mode(torch.device("cpu")) is None
    model = DigitClassifier(compile=True)
    trainer = L.Trainer(accelerator="cpu", logger=False)
    trainer.strategy.connect(model)
    model.trainer = trainer
    model.configure_model()  # compiling is lazy: nothing is built until the first forward
    assert model.compile_mode is None and model.net._compiled_call_impl is not None
    assert model.example_input_array is None  # nothing left to trace for TensorBoard's graph


def test_channels_last_on_cpus_changes_no_value(synthetic_cfg, tmp_path: Path):
    """channels_last=auto trains with NHWC conv weights on a CPU (false keeps NCHW). The layout changes no value:
    the same batch gives the same loss and gradients, and the NHWC run's checkpoint loads into a plain net."""
    from hydra.utils import instantiate

    from digit_lightning.checkpoint import load_checkpoint

    layouts, models = {}, {}

    class Look(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
            weight = pl_module.net.conv2.weight  # 20x10x3x3: NHWC and NCHW strides differ (unlike conv1's 1 channel)
            nhwc, nchw = weight.is_contiguous(memory_format=torch.channels_last), weight.is_contiguous()
            layouts[pl_module.channels_last] = "nhwc" if nhwc else "nchw" if nchw else "other"

    for layout in ("auto", "false"):
        cfg = synthetic_cfg(f"model.channels_last={layout}", "trainer.max_epochs=1", "+trainer.limit_train_batches=3",
                       "+trainer.limit_val_batches=1")  # fmt: skip
        model = instantiate(cfg.model)
        trainer = instantiate(cfg.trainer, callbacks=[Look()], logger=False, default_root_dir=str(tmp_path / layout))
        trainer.fit(model, instantiate(cfg.data))
        models[layout] = model
    assert layouts == {"auto": "nhwc", False: "nchw"}
    saved = load_checkpoint(next((tmp_path / "auto" / "checkpoints").glob("*.ckpt")))  # built plain, as eval does
    assert saved.net.conv2.weight.is_contiguous()
    for name, value in models["auto"].net.state_dict().items():
        assert torch.equal(value, saved.net.state_dict()[name]), name

    torch.manual_seed(0)
    plain, nhwc = DigitClassifier().net, DigitClassifier().net
    nhwc.load_state_dict(plain.state_dict())
    nhwc.to(memory_format=torch.channels_last)
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    losses = [torch.nn.functional.nll_loss(net(x), y) for net in (plain, nhwc)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[0], losses[1])
    for a, b in zip(plain.parameters(), nhwc.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)
    with pytest.raises(ModelError, match="channels_last"):
        DigitClassifier(channels_last="yes")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_compiled_net_trains_on_a_gpu_under_cuda_graphs(make_cfg):
    from digit_lightning.train import train

    limits = ["+trainer.limit_train_batches=30", "+trainer.limit_val_batches=2", "+trainer.limit_test_batches=2"]
    metrics = train(
        make_cfg("trainer=gpu", "model.compile=true", "trainer.max_epochs=1", "data.batch_size=64", *limits)
    )
    assert metrics["test/acc"] > 0.5, metrics


def test_training_starts_without_the_model_summary_table():
    assert compose_config(["paths.output_dir=/tmp/x"]).trainer.enable_model_summary is False


def run_bench(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_bench_smoke(mnist_dir: Path):
    out = run_bench("bench/bench.py", "--smoke", "--data", str(mnist_dir)).stdout
    assert "| `import` in a fresh process: `lightning, hydra, torchmetrics` vs `digit_lightning.train`" in out
    assert "| images/s, batch 16, 320 images x 1, in one process at " in out
    assert "| cost of logging every step" in out and " ms/step |" in out
    assert "Measured on " in out and "cores" in out


@pytest.mark.slow
def test_bench_profile_splits_a_step_into_parts_that_add_up(mnist_dir: Path):
    """`make bench ARGS=--profile`: CPU ms per step in forward, backward, optimizer, hooks, logging, data..."""
    out = run_bench("bench/bench.py", "--profile", "--smoke", "--data", str(mnist_dir)).stdout
    assert "Measured on " in out and "cores" in out  # the CPU model
    rows = dict(re.findall(r"^\| ([^|*]+?) \| ([\d.]+) \| \d+% \|$", out, re.MULTILINE))
    for part in ("data", "forward", "backward", "optimizer", "progress bar", "callback and module hooks", "logging"):
        assert any(name.startswith(part) for name in rows), (part, out)
    whole = float(re.search(r"\| \*\*whole step\*\* \| \*\*([\d.]+)\*\* \|", out).group(1))
    assert sum(map(float, rows.values())) == pytest.approx(whole, abs=0.01 * len(rows))
    bare = float(
        re.search(
            r"\| the bare net, no Lightning: forward [\d.]+, backward [\d.]+, optimizer [\d.]+ \| ([\d.]+) \|", out
        ).group(1)
    )
    assert bare > 0  # measured and printed; compared with the whole step by a reader, never here (timings vary)


@pytest.mark.slow
def test_reference_learns_on_a_slice(mnist_dir: Path):
    out = run_bench("bench/reference.py", "--data", str(mnist_dir), "--images", "6000", "--threads", "1").stdout
    accuracy = float(out.split("test accuracy ")[1].split(",")[0])
    assert 0.9 < accuracy < 1.0, out  # 6,000 images of one cycle; chance is 0.1


@pytest.mark.slow
def test_model_table_is_written_from_real_runs(mnist_dir: Path, tmp_path: Path):
    """bench/models.py trains each (model, seed) as a whole command, then tabulates the runs' metrics.json."""
    root = tmp_path / "zoo"
    run_bench("bench/models.py", "run", "--models", "lenet5", "--seeds", "1,2", "--epochs", "1", "--root", str(root),
              f"paths.data_dir={mnist_dir}", "+trainer.limit_train_batches=20", "logger=none")  # fmt: skip
    doc = tmp_path / "models.md"
    doc.write_text("intro\n<!-- model-table:start -->\nan old table\n<!-- model-table:end -->\noutro\n")
    run_bench("bench/models.py", "table", str(root), "--write", str(doc))
    text = doc.read_text()
    accs = [100 * json.loads((root / "lenet5_e1" / f"seed{seed}" / "metrics.json").read_text())["test/acc"]
            for seed in (1, 2)]  # fmt: skip
    row = f"| lenet5 | 61,706 | 1 | 16 | 2 | {statistics.mean(accs):.2f}% ± {statistics.stdev(accs):.2f} | "
    assert row in text, text
    assert "| strong (`experiment=record`) | 325,994 | 30 | 128 | – | not run here | – | GPU |" in text  # planned
    assert text.startswith("intro\n<!-- model-table:start -->\n| model |") and text.endswith("end -->\noutro\n")
    assert "an old table" not in text

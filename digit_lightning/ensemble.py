"""Ensembles and test-time augmentation: several checkpoints (or one, shifted a little) as one model.

`load_model(["a.ckpt", "b.ckpt"], tta=True)` is a `DigitClassifier` like `load_checkpoint`'s whose net is an
`Ensemble` of the checkpoints' nets, each wrapped in `ShiftTTA`: its log-probabilities are the log of the mean of
the members' probabilities. Eval, predict and export take it as they take one checkpoint's model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import rich
import torch
import torch.nn.functional as F
from omegaconf import ListConfig
from rich.table import Table
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from digit_lightning.checkpoint import load_checkpoint
from digit_lightning.module import DigitClassifier
from digit_lightning.runs import ResumeError, run_model

# The image itself and one-pixel shifts in the four directions. MNIST digits sit in a 20x20 box with a 4-pixel
# background margin, so rolling by one pixel only moves background around the border.
SHIFTS: tuple[tuple[int, int], ...] = ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1))


def mean_of_probs(log_probs: list[torch.Tensor]) -> torch.Tensor:
    """log(mean_i exp(log_probs[i])), computed stably: the log of the averaged probabilities."""
    return torch.stack(log_probs).logsumexp(dim=0) - math.log(len(log_probs))


class ShiftTTA(nn.Module):
    """Test-time augmentation: a net's probabilities averaged over the image and its one-pixel shifts (`SHIFTS`)."""

    def __init__(self, net: nn.Module, shifts: Sequence[tuple[int, int]] = SHIFTS) -> None:
        super().__init__()
        self.net = net
        self.shifts: list[list[int]] = [list(s) for s in shifts]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Log of the mean probabilities over the shifted views (one batched call of the net)."""
        views = torch.cat([torch.roll(x, s, dims=[2, 3]) for s in self.shifts])
        # unflatten, not chunk: an exported graph keeps the batch axis dynamic (chunk fixed it to the example's)
        return mean_of_probs(list(self.net(views).unflatten(0, (len(self.shifts), -1)).unbind(0)))


class Ensemble(nn.Module):
    """Several nets as one: the log of their mean probabilities (each net returns log-probabilities)."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Log of the members' mean probabilities."""
        outputs: list[torch.Tensor] = []
        for member in self.members:  # a loop, not a comprehension: TorchScript iterates a ModuleList only so
            outputs.append(member(x))
        return mean_of_probs(outputs)


def checkpoint_paths(spec: Any, log_dir: str | Path = "logs") -> list[Path]:
    """`ckpt_path` as a list of checkpoint files: one value (file, run dir, `last`) or a list of them; a run stands for
    its model (`runs.run_model`)."""
    items = list(spec) if isinstance(spec, (list, tuple, ListConfig)) else [spec]
    if not items or any(item in (None, "") for item in items):
        raise ResumeError("ckpt_path is empty; pass a checkpoint, or a list of them: 'ckpt_path=[a.ckpt,b.ckpt]'")
    return [run_model(str(item), log_dir) for item in items]


def load_model(
    paths: Sequence[str | Path], tta: bool = False, map_location: str | torch.device = "cpu"
) -> DigitClassifier:
    """One checkpoint's model (`load_checkpoint`), or, for several paths or `tta`, a model whose net is an
    `Ensemble` of theirs (each member in `ShiftTTA` when `tta`), in eval mode."""
    models = [load_checkpoint(p, map_location) for p in paths]
    model = models[0]
    if len(models) == 1 and not tta:
        return model
    nets = [ShiftTTA(m.net) if tta else m.net for m in models]
    model.net = nets[0] if len(nets) == 1 else Ensemble(nets)
    return model.eval()


def members(model: nn.Module) -> list[nn.Module]:
    """The members of an ensemble model's net; empty for a single net."""
    net = getattr(model, "net", model)
    return list(net.members) if isinstance(net, Ensemble) else []


class MemberScores(L.Callback):
    """Each ensemble member's test accuracy and loss, read by forward hooks from the same pass as the ensemble's."""

    def __init__(self, nets: Sequence[nn.Module]) -> None:
        self.nets = list(nets)
        self.acc = [MulticlassAccuracy(num_classes=10, average="micro", validate_args=False) for _ in self.nets]
        self.loss = [MeanMetric(nan_strategy="disable") for _ in self.nets]
        self.outputs: list[torch.Tensor | None] = [None] * len(self.nets)
        self.hooks: list[Any] = []

    def _keep(self, i: int) -> Any:
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            self.outputs[i] = output.detach()

        return hook

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Reset the metrics on the module's device and hook every member."""
        self.acc = [m.to(pl_module.device) for m in self.acc]
        self.loss = [m.to(pl_module.device) for m in self.loss]
        for metric in (*self.acc, *self.loss):
            metric.reset()
        self.hooks = [net.register_forward_hook(self._keep(i)) for i, net in enumerate(self.nets)]

    def on_test_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        """Score each member's output for this batch."""
        y = batch[1]
        for out, acc, loss in zip(self.outputs, self.acc, self.loss, strict=True):
            acc.update(out.argmax(dim=1), y)
            loss.update(F.nll_loss(out, y, reduction="none"))

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Remove the hooks."""
        for hook in self.hooks:
            hook.remove()
        self.hooks = []

    def compute(self) -> list[dict[str, float]]:
        """test/acc and test/loss of each member, in order."""
        return [
            {"test/acc": float(acc.compute()), "test/loss": float(loss.compute())}
            for acc, loss in zip(self.acc, self.loss, strict=True)
        ]


def ensemble_report(paths: Sequence[Path], tta: bool, member_scores: list[dict[str, float]]) -> dict[str, Any]:
    """What eval.json adds for an ensemble or TTA: the checkpoints, and each member's test metrics."""
    if len(paths) == 1 and not tta:
        return {}
    extra: dict[str, Any] = {"tta": bool(tta)}
    if len(paths) > 1:
        extra["ckpt_path"] = [str(Path(p).resolve()) for p in paths]
        extra["ensemble"] = [
            {"ckpt_path": str(Path(p).resolve()), **s} for p, s in zip(paths, member_scores, strict=True)
        ]
    return extra


def print_members(result: dict[str, Any]) -> None:
    """Say what was evaluated, when it was an ensemble or TTA: each member's test metrics beside the ensemble's."""
    tta = " with test-time augmentation (mean over the image and 4 one-pixel shifts)" if result.get("tta") else ""
    if "ensemble" not in result:
        if tta:
            rich.print(f"evaluated one checkpoint{tta}")
        return
    table = Table(title=f"ensemble of {len(result['ensemble'])} checkpoints: each member alone{tta and ', with TTA'}")
    for column in ("member", "test/acc", "test/loss", "checkpoint"):
        table.add_column(column, justify="left" if column == "checkpoint" else "right", overflow="fold")
    for i, m in enumerate(result["ensemble"], 1):
        table.add_row(str(i), f"{m['test/acc']:.4f}", f"{m['test/loss']:.4f}", m["ckpt_path"])
    table.add_row(
        "ensemble",
        f"{result['test/acc']:.4f}",
        f"{result['test/loss']:.4f}",
        "mean of the members' probabilities",
        style="bold",
    )
    rich.print(table)
    rich.print(f"[bold]evaluated an ensemble of {len(result['ensemble'])} checkpoints{tta}: "
               f"test/acc={result['test/acc']:.4f}  test/loss={result['test/loss']:.4f}[/bold]")  # fmt: skip

"""Evaluate a checkpoint on the official test set: `python -m digit_lightning.eval ckpt_path=<file.ckpt>`.

`'ckpt_path=[a.ckpt,b.ckpt,c.ckpt]'` evaluates the ensemble of those checkpoints (their mean probabilities) and
reports each member's test metrics too; `tta=true` averages over one-pixel shifts (digit_lightning.ensemble).

Reports test/acc and test/loss (the same numbers training's test reported for that checkpoint), per-class precision,
recall and F1, and the confusion matrix: as a table, as JSON in the run directory, and in TensorBoard.
"""

from __future__ import annotations

from digit_lightning import cli

cli.answer_help(__name__, "eval")  # before torch and Lightning: help needs neither

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import rich
import torch
from omegaconf import DictConfig
from rich.table import Table
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from digit_lightning.atomic import atomic_open
from digit_lightning.callbacks.dashboards import Dashboards
from digit_lightning.checkpoint import read_checkpoint
from digit_lightning.config import validate_config
from digit_lightning.ensemble import MemberScores, checkpoint_paths, ensemble_report, load_model, members, print_members
from digit_lightning.runs import ResumeError
from digit_lightning.tensorboard import checkpoint_hparams, log_class_table, log_hparams, log_run_summary, logger_of

log = logging.getLogger(__name__)


class ClassMetrics(L.Callback):
    """Accumulates per-class precision, recall, F1 and the confusion matrix from the test step's log-probabilities."""

    def __init__(self) -> None:
        per_class = {"average": None, "num_classes": 10, "validate_args": False}
        self.metrics = MetricCollection(
            {
                "precision": MulticlassPrecision(**per_class),
                "recall": MulticlassRecall(**per_class),
                "f1": MulticlassF1Score(**per_class),
                "confusion_matrix": MulticlassConfusionMatrix(num_classes=10, validate_args=False),
            }
        )

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Reset the per-class metrics on the module's device."""
        self.metrics = self.metrics.to(pl_module.device)
        self.metrics.reset()

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: torch.Tensor,
        batch: tuple[torch.Tensor, torch.Tensor],
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Update the per-class metrics with the batch's predictions."""
        self.metrics.update(outputs.argmax(dim=1), batch[1])

    def compute(self) -> dict[str, torch.Tensor]:
        """The per-class precision, recall and F1 over every test batch seen, on the CPU."""
        return {k: v.cpu() for k, v in self.metrics.compute().items()}


def report(ckpt_path: str, scores: dict[str, float], per_class: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The evaluation as plain data (what eval.json holds)."""
    matrix = per_class["confusion_matrix"]
    support = matrix.sum(dim=1)
    classes = {
        str(d): {
            "precision": float(per_class["precision"][d]),
            "recall": float(per_class["recall"][d]),
            "f1": float(per_class["f1"][d]),
            "support": int(support[d]),
        }
        for d in range(10)
    }
    return {
        "ckpt_path": str(Path(ckpt_path).resolve()),
        "num_images": int(matrix.sum()),
        "test/acc": scores["test/acc"],
        "test/loss": scores["test/loss"],
        "macro": {k: float(per_class[k].mean()) for k in ("precision", "recall", "f1")},
        "per_class": classes,
        "confusion_matrix": {"rows": "true digit", "columns": "predicted digit", "counts": matrix.tolist()},
    }


def print_report(result: dict[str, Any]) -> None:
    """Per-class table, then the confusion matrix, then the totals."""
    rich.print(f"checkpoint: {result['ckpt_path']}")
    table = Table(title=f"per-class metrics on {result['num_images']} test images")
    for column in ("digit", "precision", "recall", "F1", "support"):
        table.add_column(column, justify="right")
    for digit, m in result["per_class"].items():
        table.add_row(digit, f"{m['precision']:.4f}", f"{m['recall']:.4f}", f"{m['f1']:.4f}", str(m["support"]))
    macro = result["macro"]
    table.add_row(
        "macro", f"{macro['precision']:.4f}", f"{macro['recall']:.4f}", f"{macro['f1']:.4f}", "", style="bold"
    )
    rich.print(table)

    confusion = Table(title="confusion matrix (rows: true digit, columns: predicted)")
    confusion.add_column("")
    for d in range(10):
        confusion.add_column(str(d), justify="right")
    for d, row in enumerate(result["confusion_matrix"]["counts"]):
        cells = [f"[bold]{n}[/bold]" if i == d else (str(n) if n else "[dim]0[/dim]") for i, n in enumerate(row)]
        confusion.add_row(str(d), *cells)
    rich.print(confusion)
    rich.print(f"[bold]test/acc={result['test/acc']:.4f}  test/loss={result['test/loss']:.4f}[/bold]")


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Test `cfg.ckpt_path` on the official test set; log, write and return the report."""
    validate_config(cfg, "eval")
    if not cfg.get("ckpt_path"):
        raise ResumeError("ckpt_path is not set; pass ckpt_path=last, a run dir or a .ckpt file")
    ckpt_paths = checkpoint_paths(cfg.ckpt_path, cfg.paths.log_dir)
    model = load_model(ckpt_paths, tta=cfg.get("tta", False))
    datamodule: L.LightningDataModule = hydra.utils.instantiate(cfg.data)
    class_metrics, member_scores = ClassMetrics(), MemberScores(members(model))
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer,
        callbacks=[class_metrics, member_scores, Dashboards()],
        logger=cli.instantiate_group(cfg.get("logger")),
    )
    params = checkpoint_hparams(ckpt_paths, cfg)
    if params is not None:  # the evaluated run's settings: the eval is a row beside it in the HParams tab
        log_hparams(trainer.loggers, params)
    scores = trainer.test(model, datamodule=datamodule, verbose=False)[0]
    result = report(str(ckpt_paths[0]), scores, class_metrics.compute())
    result.update(ensemble_report(ckpt_paths, cfg.get("tta", False), member_scores.compute()))

    if (tb := logger_of(trainer.loggers)) is not None:
        log_class_table(tb, result)  # the PR curves and the confusion matrix come from Dashboards
        known = {k: float(v) for k, v in scores.items()}
        if len(ckpt_paths) == 1:  # the best validation accuracy of the checkpoint's run, which it keeps
            best = read_checkpoint(ckpt_paths[0])["state_dict"].get("val_acc_best.max_value")
            known.update({"val/acc_best": float(best)} if best is not None and best.isfinite() else {})
        log_run_summary(trainer.loggers, params or {"run": "eval"}, known, trainer.global_step)
        tb.experiment.flush()

    print_report(result)
    print_members(result)
    if cfg.get("output_json"):
        out = Path(cfg.output_json)
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(out) as f:  # a temp file renamed into place: a planted link is replaced, not followed
            f.write((json.dumps(result, indent=2) + "\n").encode())
        log.info(f"Wrote {out}")
    return result


@hydra.main(version_base="1.3", config_path=cli.CONFIG_DIR, config_name="eval")
def hydra_main(cfg: DictConfig) -> float:
    """The Hydra task: evaluate and return test/acc."""
    cli.route_lightning_logs()
    with cli.exit_on_user_error():
        return evaluate(cfg)["test/acc"]


def main() -> None:
    """CLI entry point: any user error is one `error:` line, exit status 2 (see digit_lightning.cli)."""
    cli.run(hydra_main)


if __name__ == "__main__":
    main()

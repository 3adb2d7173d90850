"""TensorBoard dashboards worth opening: the Custom Scalars layout, confusion matrices, misclassified digits, sample
inputs and per-class PR curves.

`Dashboards` is a Lightning callback (conf/callbacks/default.yaml; eval adds it too). It keeps its per-batch work
on the device (no host syncs) and renders matplotlib figures (Agg backend) once per validation or test epoch, sized
to be read at TensorBoard's default image size. Without a TensorBoard logger (`logger=csv`, `logger=none`) it does
nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torchmetrics.classification import MulticlassConfusionMatrix

from digit_lightning.data.mnist import MNIST_MEAN, MNIST_STD
from digit_lightning.tensorboard import logger_of, write_layout

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CLASSES = [str(d) for d in range(10)]


def pyplot():  # noqa: ANN201
    """matplotlib's pyplot on the Agg backend (to memory: no display), imported on first use: it is slow to import."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def confusion_figure(matrix: torch.Tensor, title: str = "confusion matrix") -> Figure:
    """A 10x10 confusion matrix (rows: true digit, columns: predicted) with counts in the cells. The mistakes are
    coloured on a log scale and the diagonal is grey, so that a handful of 4-as-9 stands out next to 1,000 right."""
    from matplotlib.colors import LogNorm

    plt = pyplot()
    counts = matrix.detach().cpu().numpy().astype(np.int64)
    diagonal = np.eye(len(counts), dtype=bool)
    mistakes = np.ma.masked_where(diagonal | (counts == 0), counts)
    fig, ax = plt.subplots(figsize=(7, 6.2), dpi=100)
    ax.imshow(np.where(diagonal, 1.0, np.nan), cmap="Greys", vmin=0, vmax=4)  # light grey diagonal
    worst = max(int(mistakes.max()) if mistakes.count() else 1, 2)
    image = ax.imshow(mistakes, cmap="Reds", norm=LogNorm(vmin=1, vmax=worst))
    for i, j in zip(*np.nonzero(counts), strict=True):
        dark = not diagonal[i, j] and counts[i, j] > worst**0.6
        ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=11 if diagonal[i, j] else 12,
                color="white" if dark else "black", weight="normal" if diagonal[i, j] else "bold")  # fmt: skip
    ax.set_xticks(range(10), CLASSES, fontsize=12)
    ax.set_yticks(range(10), CLASSES, fontsize=12)
    ax.set_xlabel("predicted digit", fontsize=13)
    ax.set_ylabel("true digit", fontsize=13)
    errors = int(counts[~diagonal].sum())
    ax.set_title(f"{title}\n{errors} mistakes in {int(counts.sum())} images", fontsize=14)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="mistakes (log scale)")
    fig.tight_layout()
    return fig


def image_grid(images: torch.Tensor, titles: list[str], title: str, columns: int = 6) -> Figure:
    """A grid of normalized 1x28x28 digits (white on black, as MNIST shows them), each with a short caption in a
    font large enough to read when TensorBoard shrinks the figure to its card."""
    pixels = (images.detach().cpu().float() * MNIST_STD + MNIST_MEAN).clamp(0, 1).squeeze(1).numpy()
    rows = max(1, -(-len(pixels) // columns))
    fig, axes = pyplot().subplots(rows, columns, figsize=(columns * 1.5, rows * 1.75 + 0.6), dpi=100, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, caption in zip(axes.flat, pixels, titles, strict=False):
        ax.imshow(image, cmap="gray", vmin=0, vmax=1)
        ax.set_title(caption, fontsize=17, pad=3)
    fig.suptitle(title, fontsize=15)
    fig.tight_layout()
    return fig


def add_figure(logger: TensorBoardLogger, tag: str, fig: Figure, step: int) -> None:
    """Render a figure into the TensorBoard run as an image, then free it."""
    logger.experiment.add_figure(tag, fig, global_step=step, close=True)


class Dashboards(L.Callback):
    """Everything TensorBoard shows beyond the scalars the module logs:

    - at fit start, the Custom Scalars layout (train vs val loss and accuracy, learning rate);
    - once per run, `data/samples`: the first training inputs as the model sees them;
    - per validation epoch, `val/confusion_matrix` and `val/misclassified` (the epoch's first mistakes);
    - per test, `test/confusion_matrix` and one precision-recall curve per digit (`test_pr_curve/<digit>`, from the
      predicted probabilities).

    (The model graph comes from `TensorBoardLogger(log_graph=True)` and the module's `example_input_array`.)
    """

    def __init__(self, max_misclassified: int = 18, num_samples: int = 18) -> None:
        self.max_misclassified = max_misclassified
        self.num_samples = num_samples
        self.confusion = MulticlassConfusionMatrix(num_classes=10, validate_args=False)
        self._samples_logged = False
        self.wrong: dict[str, torch.Tensor] | None = None  # a fixed-size buffer of misclassified examples
        self.test_outputs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (log-probabilities, labels) per batch

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Write the Custom Scalars layout (rank 0)."""
        if (logger := logger_of(trainer.loggers)) is not None and trainer.is_global_zero:
            write_layout(logger)

    def _start_epoch(self, pl_module: L.LightningModule) -> None:
        self.confusion = self.confusion.to(pl_module.device)
        self.confusion.reset()
        self.wrong, self.test_outputs = None, []

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start a fresh confusion matrix and mistake buffer on the module's device."""
        self._start_epoch(pl_module)

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start a fresh confusion matrix and prediction list on the module's device."""
        self._start_epoch(pl_module)

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: torch.Tensor | None,
        batch: tuple[torch.Tensor, torch.Tensor],
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Add the batch to the confusion matrix and keep its first mistakes, without a host sync."""
        if trainer.sanity_checking or not isinstance(outputs, torch.Tensor):
            return
        x, y = batch
        preds = outputs.argmax(dim=1)
        self.confusion.update(preds, y)
        if self.max_misclassified <= 0:
            return
        # Keep the first `max_misclassified` mistakes without a host sync: a stable sort puts the mistakes first
        # and a fixed number of rows is kept, whatever this batch holds.
        candidate = {"x": x.detach(), "y": y, "pred": preds, "wrong": preds != y}
        if self.wrong is not None:
            candidate = {k: torch.cat([self.wrong[k], v]) for k, v in candidate.items()}
        order = torch.sort((~candidate["wrong"]).to(torch.uint8), stable=True).indices[: self.max_misclassified]
        self.wrong = {k: v[order] for k, v in candidate.items()}

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: torch.Tensor | None,
        batch: tuple[torch.Tensor, torch.Tensor],
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Add the batch to the confusion matrix and keep its probabilities for the PR curves (on the device)."""
        if not isinstance(outputs, torch.Tensor):
            return
        self.confusion.update(outputs.argmax(dim=1), batch[1])
        self.test_outputs.append((outputs.detach(), batch[1]))

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Render the epoch's confusion matrix and misclassified grid into TensorBoard (rank 0)."""
        logger = logger_of(trainer.loggers)
        if trainer.sanity_checking or logger is None or self.confusion.update_count == 0:
            return
        counts = self.confusion.compute()  # on every rank: under DDP this gathers all ranks' counts
        if not trainer.is_global_zero:
            return
        step = trainer.global_step
        matrix = confusion_figure(counts, f"validation, epoch {trainer.current_epoch}")
        add_figure(logger, "val/confusion_matrix", matrix, step)
        if self.wrong is not None:
            keep = self.wrong["wrong"].cpu()
            images, truth, preds = (self.wrong[k].cpu()[keep] for k in ("x", "y", "pred"))
            titles = [f"{t} → {p}" for t, p in zip(truth.tolist(), preds.tolist(), strict=True)]
            heading = f"misclassified: true → predicted (first {len(titles)}, epoch {trainer.current_epoch})"
            if titles:
                add_figure(logger, "val/misclassified", image_grid(images, titles, heading), step)
        self.wrong = None

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Render the test confusion matrix and write one PR curve per digit (rank 0's share of the test set)."""
        logger = logger_of(trainer.loggers)
        if logger is None or self.confusion.update_count == 0:
            return
        counts = self.confusion.compute()
        if not trainer.is_global_zero:
            return
        step = trainer.global_step
        add_figure(logger, "test/confusion_matrix", confusion_figure(counts, "test set"), step)
        probs = torch.cat([p for p, _ in self.test_outputs]).float().exp().cpu()
        labels = torch.cat([y for _, y in self.test_outputs]).cpu()
        for digit in range(10):
            logger.experiment.add_pr_curve(f"test_pr_curve/{digit}", labels == digit, probs[:, digit], step)
        self.test_outputs = []

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> None:
        """Log the first training batch once, as the model sees it, under `data/samples`."""
        if self._samples_logged or self.num_samples <= 0:
            return
        self._samples_logged = True
        logger = logger_of(trainer.loggers)
        if logger is None or not trainer.is_global_zero:
            return
        x, y = batch
        n = min(self.num_samples, len(x))
        titles = [f"label {t}" for t in y[:n].tolist()]
        fig = image_grid(x[:n], titles, "training inputs as the model sees them (normalized, augmented)")
        add_figure(logger, "data/samples", fig, trainer.global_step)

"""TensorBoard dashboards worth opening: confusion matrix, misclassified digits, sample inputs, the model graph.

`Dashboards` is a Lightning callback (conf/callbacks/default.yaml). It keeps its per-batch work on the device
(no host syncs) and renders matplotlib figures (Agg backend) once per validation epoch. Without a TensorBoard
logger (`logger=csv`, `logger=none`) it does nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torchmetrics.classification import MulticlassConfusionMatrix

from digit_lightning.data.mnist import MNIST_MEAN, MNIST_STD

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
    """A 10x10 confusion matrix (rows: true digit, columns: predicted) with counts in the cells."""
    counts = matrix.detach().cpu().numpy()
    fig, ax = pyplot().subplots(figsize=(6, 5.5), dpi=100)
    # Colour by row share, so that rare mistakes still show next to the large diagonal.
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(counts.shape[0]):
        for j in range(counts.shape[1]):
            if counts[i, j]:
                color = "white" if share[i, j] > 0.5 else "black"
                ax.text(j, i, str(int(counts[i, j])), ha="center", va="center", fontsize=7, color=color)
    ax.set(xticks=range(10), yticks=range(10), xticklabels=CLASSES, yticklabels=CLASSES)
    ax.set(xlabel="predicted", ylabel="true", title=f"{title} ({int(counts.sum())} images)")
    fig.tight_layout()
    return fig


def image_grid(images: torch.Tensor, titles: list[str], title: str, columns: int = 8) -> Figure:
    """A grid of normalized 1x28x28 digits (shown as MNIST shows them, white on black) with a caption each."""
    pixels = (images.detach().cpu().float() * MNIST_STD + MNIST_MEAN).clamp(0, 1).squeeze(1).numpy()
    rows = max(1, -(-len(pixels) // columns))
    fig, axes = pyplot().subplots(rows, columns, figsize=(columns * 1.1, rows * 1.3 + 0.4), dpi=100, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, caption in zip(axes.flat, pixels, titles, strict=False):
        ax.imshow(image, cmap="gray", vmin=0, vmax=1)
        ax.set_title(caption, fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def tensorboard(trainer: L.Trainer) -> TensorBoardLogger | None:
    """The trainer's TensorBoard logger, if it has one (`logger=csv` or `logger=none` has none)."""
    return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)


def add_figure(logger: TensorBoardLogger, tag: str, fig: Figure, step: int) -> None:
    """Render a figure into the TensorBoard run as an image, then free it."""
    logger.experiment.add_figure(tag, fig, global_step=step, close=True)


class Dashboards(L.Callback):
    """Per validation epoch: `val/confusion_matrix`, `val/misclassified`; once per run: `data/samples`.

    (The model graph comes from `TensorBoardLogger(log_graph=True)` and the module's `example_input_array`.)
    """

    def __init__(self, max_misclassified: int = 32, num_samples: int = 32) -> None:
        self.max_misclassified = max_misclassified
        self.num_samples = num_samples
        self.confusion = MulticlassConfusionMatrix(num_classes=10, validate_args=False)
        self._samples_logged = False
        self._reset()

    def _reset(self) -> None:
        self.wrong: dict[str, torch.Tensor] | None = None  # a fixed-size buffer of misclassified examples

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start a fresh confusion matrix and mistake buffer on the module's device."""
        self.confusion = self.confusion.to(pl_module.device)
        self.confusion.reset()
        self._reset()

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

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Render the epoch's confusion matrix and misclassified grid into TensorBoard (rank 0)."""
        logger = tensorboard(trainer)
        if trainer.sanity_checking or logger is None or self.confusion.update_count == 0:
            return
        counts = self.confusion.compute()  # on every rank: under DDP this gathers all ranks' counts
        if not trainer.is_global_zero:
            return
        step = trainer.global_step
        matrix = confusion_figure(counts, f"validation confusion matrix, epoch {trainer.current_epoch}")
        add_figure(logger, "val/confusion_matrix", matrix, step)
        if self.wrong is not None:
            keep = self.wrong["wrong"].cpu()
            images, truth, preds = (self.wrong[k].cpu()[keep] for k in ("x", "y", "pred"))
            titles = [f"true {t} pred {p}" for t, p in zip(truth.tolist(), preds.tolist(), strict=True)]
            heading = f"misclassified validation images (first {len(titles)}), epoch {trainer.current_epoch}"
            if len(titles):
                add_figure(logger, "val/misclassified", image_grid(images, titles, heading), step)
        self._reset()

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> None:
        """Log the first training batch once, as the model sees it, under `data/samples`."""
        if self._samples_logged or self.num_samples <= 0:
            return
        self._samples_logged = True
        logger = tensorboard(trainer)
        if logger is None or not trainer.is_global_zero:
            return
        x, y = batch
        n = min(self.num_samples, len(x))
        titles = [f"label {t}" for t in y[:n].tolist()]
        fig = image_grid(x[:n], titles, "training inputs as the model sees them (after normalization)")
        add_figure(logger, "data/samples", fig, trainer.global_step)

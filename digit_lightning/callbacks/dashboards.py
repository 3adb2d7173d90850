"""TensorBoard dashboards worth opening: the Custom Scalars layout, confusion matrices, misclassified digits, sample
inputs and per-class PR curves.

`Dashboards` is a Lightning callback (conf/callbacks/default.yaml; eval adds it too). It keeps its per-batch work
on the device (no host syncs) and renders matplotlib figures once per validation or test epoch, sized to be read at
TensorBoard's default image size. Figures are `matplotlib.figure.Figure` objects drawn by the Agg canvas, never
pyplot: a notebook or a script around a run keeps its own backend and figure list. The confusion matrices and image
grids go to MLflow and W&B too (`logger=mlflow`, `wandb`, `many`: digit_lightning.tracking); the layout, graph and PR
curves are TensorBoard's own. Without such a logger (`logger=csv`, `logger=none`) it does nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torchmetrics.classification import MulticlassConfusionMatrix

from digit_lightning.data.mnist import MNIST_MEAN, MNIST_STD
from digit_lightning.tensorboard import add_net_graph, in_sweep_job, logger_of, write_layout
from digit_lightning.tracking import log_figure, trackers

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CLASSES = [str(d) for d in range(10)]


def new_figure(**kwargs) -> Figure:  # noqa: ANN003
    """A matplotlib `Figure` outside pyplot (no backend chosen, no global figure list), imported on first use:
    matplotlib is slow to import. In a notebook it displays as the value of a cell."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def figure_pixels(fig: Figure) -> np.ndarray:
    """The figure rendered by the Agg canvas, as an RGB `[H, W, 3]` uint8 array."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


# Time Series shows an image at most ~170 pixels high (wider cards do not make it taller), and shrinks it with
# "pixelated" rendering: figures are drawn at that size, so that their text is legible as they are shown.
CARD_DPI, CARD_HEIGHT = 100, 1.7  # inches at CARD_DPI: 170 pixels
TILE, GAP, CAPTION = 28, 4, 12  # image_grid, in image pixels: a digit, the gap between two, the caption band


def confusion_figure(matrix: torch.Tensor, title: str = "confusion matrix", top: int = 8) -> Figure:
    """A 10x10 confusion matrix (rows: true digit, columns: predicted) where only the mistakes are coloured, on a log
    scale with their counts (the diagonal is grey), beside the `top` most frequent mistakes as a list."""
    from matplotlib.colors import LogNorm

    counts = matrix.detach().cpu().numpy().astype(np.int64)
    diagonal = np.eye(len(counts), dtype=bool)
    mistakes = np.ma.masked_where(diagonal | (counts == 0), counts)
    worst = max(int(mistakes.max()) if mistakes.count() else 1, 2)
    fig = new_figure(figsize=(4.4, CARD_HEIGHT), dpi=CARD_DPI)
    ax, notes = fig.subplots(1, 2, width_ratios=[1, 1.05])
    ax.imshow(np.where(diagonal, 1.0, np.nan), cmap="Greys", vmin=0, vmax=4)  # a light grey diagonal
    ax.imshow(mistakes, cmap="Reds", norm=LogNorm(vmin=0.5, vmax=worst))
    for i, j in zip(*np.nonzero(np.ma.getdata(mistakes) * ~np.ma.getmaskarray(mistakes)), strict=True):
        n = counts[i, j]
        ax.text(j, i, str(n), ha="center", va="center", fontsize=6, color="white" if n > worst**0.6 else "black")
    ax.set_xticks(range(10), CLASSES, fontsize=6.5)
    ax.set_yticks(range(10), CLASSES, fontsize=6.5)
    ax.tick_params(length=0, pad=1.5)
    ax.set_xlabel("predicted", fontsize=7, labelpad=1)
    ax.set_ylabel("true", fontsize=7, labelpad=1)
    notes.axis("off")
    ranked = sorted(((int(counts[i, j]), i, j) for i, j in zip(*np.nonzero(~diagonal & (counts > 0)), strict=True)),
                    reverse=True)[:top]  # fmt: skip
    lines = [f"{title}", f"{int(counts[~diagonal].sum())} mistakes in {int(counts.sum())}", ""]
    lines += ["most frequent (true → predicted):"] + [f"   {i} → {j}:  {n}" for n, i, j in ranked]
    notes.text(0, 1, "\n".join(lines), va="top", fontsize=8, linespacing=1.25, transform=notes.transAxes)
    fig.subplots_adjust(left=0.07, right=0.99, top=0.98, bottom=0.14, wspace=0.08)
    return fig


def image_grid(images: torch.Tensor, titles: list[str], title: str, columns: int = 8) -> Figure:
    """A grid of normalized 1x28x28 digits (white on black, as MNIST shows them) with a short caption each, drawn
    at the size TensorBoard shows it (two rows of eight fill a Time Series card).

    The digits are laid out in one image and drawn on one axes: a subplot per digit costs several times more to draw.
    """
    pixels = (images.detach().cpu().float() * MNIST_STD + MNIST_MEAN).clamp(0, 1).squeeze(1).numpy()
    rows = max(1, -(-len(pixels) // columns))
    cell_w, cell_h = TILE + GAP, TILE + CAPTION  # a cell: the digit, a gap beside it and its caption above it
    canvas = np.ones((rows * cell_h, columns * cell_w), dtype=np.float32)  # white around the digits
    for k, image in enumerate(pixels):
        row, col = divmod(k, columns)
        top, left = row * cell_h + CAPTION, col * cell_w + GAP // 2
        canvas[top : top + TILE, left : left + TILE] = image
    heading = 0.2  # inches above the grid for the title
    inches_per_pixel = (CARD_HEIGHT - heading) / (2 * cell_h)  # two rows fill a card's height
    height = rows * cell_h * inches_per_pixel + heading
    fig = new_figure(figsize=(columns * cell_w * inches_per_pixel, height), dpi=CARD_DPI)
    ax = fig.add_axes((0, 0, 1, 1 - heading / height))
    ax.imshow(canvas, cmap="gray", vmin=0, vmax=1)
    ax.axis("off")
    for k, caption in enumerate(titles[: len(pixels)]):
        row, col = divmod(k, columns)
        ax.text(col * cell_w + cell_w / 2, row * cell_h + CAPTION - 1.5, caption, ha="center", va="bottom",
                fontsize=8.5)  # fmt: skip
    fig.suptitle(title, fontsize=8.5, y=0.995)
    return fig


def add_figure(logger: TensorBoardLogger, tag: str, fig: Figure, step: int) -> None:
    """Render a figure into the TensorBoard run as an image (SummaryWriter.add_figure would import pyplot)."""
    logger.experiment.add_image(tag, figure_pixels(fig), global_step=step, dataformats="HWC")


# Time Series opens its first two groups: what a run shows once goes to `whole_run/`, which sorts last
# (digit_lightning.tensorboard.METRICS), not to `test/` with one card per run on the first screen.
TENSORBOARD_TAGS = {"test/confusion_matrix": "whole_run/test_confusion_matrix"}


def publish(trainer: L.Trainer, tag: str, fig: Figure, step: int) -> None:
    """A figure to every logger of `trainer` that shows pictures (TensorBoard, MLflow, W&B)."""
    log_figure(trainer.loggers, tag, fig, step)
    logger = logger_of(trainer.loggers)
    if logger is not None:
        add_figure(logger, TENSORBOARD_TAGS.get(tag, tag), fig, step)


def shows_pictures(trainer: L.Trainer) -> bool:
    """Whether a logger of `trainer` shows pictures."""
    return logger_of(trainer.loggers) is not None or bool(trackers(trainer.loggers))


class Dashboards(L.Callback):
    """Everything TensorBoard shows beyond the scalars the module logs:

    - at fit start, the Custom Scalars layout (train vs val loss and accuracy, learning rate);
    - at fit start, the net's graph (Graphs tab), its layers at the top level (`graph=False`: none);
    - once per run, `train_inputs/samples`: the first training inputs as the model sees them (single runs only);
    - per validation epoch, `val/confusion_matrix` and `val/misclassified` (the epoch's first mistakes);
    - per test, `test/confusion_matrix` (TensorBoard: `whole_run/test_confusion_matrix`, with the run's other
      one-off values) and one precision-recall curve per digit (`test_pr_curve/<digit>`, from the predicted
      probabilities).

    """

    def __init__(self, max_misclassified: int = 16, num_samples: int = 16, graph: bool = True) -> None:
        self.max_misclassified = max_misclassified
        self.num_samples = num_samples
        self.graph = graph
        self.confusion = MulticlassConfusionMatrix(num_classes=10, validate_args=False)
        self._samples_logged = False
        self.wrong: dict[str, torch.Tensor] | None = None  # a fixed-size buffer of misclassified examples
        self.test_outputs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (log-probabilities, labels) per batch

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Write the Custom Scalars layout and the net's graph (rank 0)."""
        logger = logger_of(trainer.loggers)
        if logger is None or not trainer.is_global_zero:
            return
        write_layout(logger)
        example = pl_module.example_input_array  # None once the net is compiled: a compiled net cannot be traced
        if self.graph and isinstance(example, torch.Tensor) and isinstance(getattr(pl_module, "net", None), nn.Module):
            add_net_graph(logger, pl_module.net, example.to(pl_module.device))

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
        """Render the epoch's confusion matrix and misclassified grid into the loggers (rank 0)."""
        if trainer.sanity_checking or not shows_pictures(trainer) or self.confusion.update_count == 0:
            return
        counts = self.confusion.compute()  # on every rank: under DDP this gathers all ranks' counts
        if not trainer.is_global_zero:
            return
        step = trainer.global_step
        matrix = confusion_figure(counts, f"validation, epoch {trainer.current_epoch}")
        publish(trainer, "val/confusion_matrix", matrix, step)
        if self.wrong is not None:
            keep = self.wrong["wrong"].cpu()
            images, truth, preds = (self.wrong[k].cpu()[keep] for k in ("x", "y", "pred"))
            titles = [f"{t} → {p}" for t, p in zip(truth.tolist(), preds.tolist(), strict=True)]
            heading = f"true → predicted, epoch {trainer.current_epoch}"
            if titles:
                publish(trainer, "val/misclassified", image_grid(images, titles, heading), step)
        self.wrong = None

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Render the test confusion matrix and write one PR curve per digit (rank 0's share of the test set)."""
        if not shows_pictures(trainer) or self.confusion.update_count == 0:
            return
        counts = self.confusion.compute()
        if not trainer.is_global_zero:
            return
        step = trainer.global_step
        publish(trainer, "test/confusion_matrix", confusion_figure(counts, "test set"), step)
        logger = logger_of(trainer.loggers)
        if logger is None:
            self.test_outputs = []
            return
        probs = torch.cat([p for p, _ in self.test_outputs]).float().exp().cpu()
        labels = torch.cat([y for _, y in self.test_outputs]).cpu()
        for digit in range(10):
            logger.experiment.add_pr_curve(f"test_pr_curve/{digit}", labels == digit, probs[:, digit], step)
        self.test_outputs = []

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> None:
        """Log the first training batch once, as the model sees it, under `train_inputs/samples` (not in a sweep's
        jobs: each would add one more identical card)."""
        if self._samples_logged or self.num_samples <= 0 or in_sweep_job():
            return
        self._samples_logged = True
        if not shows_pictures(trainer) or not trainer.is_global_zero:
            return
        x, y = batch
        n = min(self.num_samples, len(x))
        fig = image_grid(x[:n], [str(t) for t in y[:n].tolist()], "training inputs and their labels")
        publish(trainer, "train_inputs/samples", fig, trainer.global_step)

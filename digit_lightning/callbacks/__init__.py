"""Lightning callbacks of this package: TensorBoard dashboards, a NaN/inf guard, resumable runs, weight EMA, and
the progress bar."""

from digit_lightning.callbacks.dashboards import Dashboards
from digit_lightning.callbacks.ema import EMA
from digit_lightning.callbacks.guards import FiniteLossGuard, NonFiniteLossError
from digit_lightning.callbacks.progress import ProgressBar
from digit_lightning.callbacks.resumable import ResumableRun

__all__ = ["EMA", "Dashboards", "FiniteLossGuard", "NonFiniteLossError", "ProgressBar", "ResumableRun"]

"""A checkpoint as an MLflow model: `mlflow.pyfunc.load_model(uri).predict(images)` returns digits.

Its input is what the nets take (and the ONNX export): normalized float32 images `[N, 1, 28, 28]`
(`digit_lightning.data.preprocess.preprocess_image` makes one from an image file); its output the N digits (int64).
The model is logged from code (this file, which ends by naming the model: MLflow's "models from code", no pickle),
the checkpoint inside it as an artifact; loading it needs `digit-lightning` installed, as eval does. Imports
mlflow: `digit_lightning.tracking` imports this module only when a model is logged.
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

from digit_lightning import __version__

SIGNATURE = ModelSignature(
    inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1, 28, 28))]),
    outputs=Schema([TensorSpec(np.dtype(np.int64), (-1,))]),
)


class DigitModel(mlflow.pyfunc.PythonModel):
    """The pyfunc model: the checkpoint's net, in eval mode on the CPU, argmax over its log-probabilities."""

    def load_context(self, context: Any) -> None:
        """Rebuild the net from the checkpoint artifact (by name, without running code from it)."""
        from digit_lightning.checkpoint import load_checkpoint

        self.model = load_checkpoint(context.artifacts["checkpoint"])

    def predict(self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None) -> np.ndarray:
        """The digit of each image of `model_input` (`[N, 1, 28, 28]` normalized float32)."""
        with torch.inference_mode():
            images = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
            return self.model(images).argmax(dim=1).numpy().astype(np.int64)


def log_model(run_id: str, checkpoint: str, register_as: str | None = None) -> Any:
    """Log `checkpoint` as the MLflow model `model` of run `run_id` (with SIGNATURE); register it as
    `register_as` if given. Returns MLflow's ModelInfo (its `model_uri` loads it)."""
    with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=__file__,
            artifacts={"checkpoint": checkpoint},
            signature=SIGNATURE,
            input_example=np.zeros((1, 1, 28, 28), dtype=np.float32),  # checked against the signature when logged
            # named, not inferred: inferring loads the model in a subprocess, seconds of torch imports per run
            pip_requirements=[f"digit-lightning=={__version__}", f"torch=={torch.__version__.split('+')[0]}"],
            registered_model_name=register_as,
        )


mlflow.models.set_model(DigitModel())  # what MLflow loads from this file

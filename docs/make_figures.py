"""Make the README's figures from a real training run: `python docs/make_figures.py [--run RUN_DIR] [--out DIR]`.

Without `--run` it trains a short run first (1 epoch of 150 batches of 64 images on the CPU, about a minute), the
one the README's *Evaluate* example uses. The figures are the images the run's `Dashboards` callback logged to
TensorBoard (what `make tensorboard` shows under Images), read back from the event file:
`samples.png` (training inputs, `train_inputs/samples`), `confusion_matrix.png` and `misclassified.png` (validation,
last epoch). The pictures of TensorBoard pages themselves come from `docs/screenshots.py`.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

FIGURES = {"train_inputs/samples": "samples.png", "val/confusion_matrix": "confusion_matrix.png",
           "val/misclassified": "misclassified.png"}  # fmt: skip
SHORT_RUN = ["trainer=cpu", "data.batch_size=64", "trainer.max_epochs=1", "+trainer.limit_train_batches=150",
             "callbacks.progress_bar=null", "callbacks.dashboards.graph=false"]  # fmt: skip


def train_short_run(run_dir: Path) -> None:
    """Train the README's small example run into `run_dir` (TensorBoard logger and dashboards on)."""
    from digit_lightning.cli import compose_config
    from digit_lightning.train import train

    train(compose_config([f"paths.output_dir={run_dir}", *SHORT_RUN]))


def extract_figures(run_dir: Path, out_dir: Path) -> list[Path]:
    """Write the last image of each dashboard tag in `run_dir/tensorboard` to `out_dir` as PNG files."""
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={IMAGES: 0})  # 0: keep every image
    events.Reload()
    tags = events.Tags()[IMAGES]
    missing = [tag for tag in FIGURES if tag not in tags]
    if missing:
        raise SystemExit(f"error: {run_dir}/tensorboard has no {', '.join(missing)} images; train with "
                         "callbacks=default and logger=tensorboard")  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for tag, name in FIGURES.items():
        image = events.Images(tag)[-1]  # the last epoch's
        (out_dir / name).write_bytes(image.encoded_image_string)  # TensorBoard stores the PNG as it was rendered
        written.append(out_dir / name)
    return written


def main() -> None:
    """Parse the arguments, train if no run is given, write the figures and list them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a training run dir (default: train a short run in a temp dir)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "images")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.run
        if run_dir is None:
            run_dir = Path(tmp) / "run"
            train_short_run(run_dir)
        for path in extract_figures(run_dir, args.out):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()

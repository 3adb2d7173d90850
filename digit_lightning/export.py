"""Export a checkpoint to run without this package: `python -m digit_lightning.export ckpt_path=<ckpt> format=onnx`.

Both formats take normalized Nx1x28x28 float32 images (see digit_lightning.preprocess) of any batch size N and
return Nx10 log-probabilities; a list of checkpoints (`'ckpt_path=[a.ckpt,b.ckpt]'`) exports their ensemble, and
`tta=true` the test-time augmented model (digit_lightning.ensemble). After writing, the file is loaded back
(onnxruntime / torch.jit) and compared with the PyTorch model.
"""

from __future__ import annotations

from digit_lightning import cli

cli.answer_help(__name__, "export")  # before torch and Lightning: help needs neither

import io
import os
import warnings
from contextlib import redirect_stdout
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from digit_lightning.atomic import temp_beside
from digit_lightning.config import validate_config
from digit_lightning.data.mnist import MNIST_MEAN, MNIST_STD
from digit_lightning.ensemble import checkpoint_paths, load_model

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
INPUT, OUTPUT = "image", "log_probs"
MIN_OPSET = 18  # torch.onnx's exporter writes opset 18 for anything older (after a traceback)


class ExportError(cli.UserError):
    """An export that cannot be done as asked; one line saying why."""


def export_onnx(net: nn.Module, path: Path, opset: int = 18) -> None:
    """ONNX with a dynamic batch axis, one self-contained file, MNIST normalization recorded in its metadata."""
    try:
        import onnx
    except ImportError:
        raise ExportError("ONNX export needs the export extra: pip install 'digit-lightning[export]'") from None

    newest = onnx.defs.onnx_opset_version()
    if opset > newest:
        raise ExportError(f"opset={opset}: newer than the installed onnx knows; pass opset={MIN_OPSET} to {newest}")
    example = torch.zeros(2, 1, 28, 28)
    with warnings.catch_warnings(), redirect_stdout(io.StringIO()):  # the exporter reports its progress on stdout
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            net,
            (example,),
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            opset_version=opset,
            dynamo=True,
            external_data=False,
        )
    model = program.model_proto
    written = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if written != opset:  # the exporter falls back to the opset it knows when it cannot convert
        raise ExportError(f"opset={opset}: torch's exporter cannot write it (it wrote opset {written}); pass "
                          f"opset={written}")  # fmt: skip
    for key, value in metadata().items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    onnx.save_model(model, str(path))


def export_torchscript(net: nn.Module, path: Path) -> None:
    """TorchScript (torch.jit.script), loadable with torch.jit.load and no Python source; metadata as extra files."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in favour of torch.export, but works
        scripted = torch.jit.script(net)
        torch.jit.save(scripted, str(path), _extra_files={"metadata.txt": repr(metadata())})


def metadata() -> dict[str, str]:
    """What a consumer needs to feed the model correctly."""
    return {
        "input": f"{INPUT}: float32 [N, 1, 28, 28], MNIST-style digit (white ink on black, 20x20 box, centred by "
        f"mass), normalized as (pixel/255 - {MNIST_MEAN}) / {MNIST_STD}",
        "output": f"{OUTPUT}: float32 [N, 10], log-probabilities of the digits 0-9",
        "preprocess": "digit_lightning.preprocess.preprocess_image",
        "mnist_mean": str(MNIST_MEAN),
        "mnist_std": str(MNIST_STD),
    }


def run_exported(path: Path, fmt: str, images: torch.Tensor) -> np.ndarray:
    """Log-probabilities from the exported file, run by onnxruntime or torch.jit (not by this package's code)."""
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run([OUTPUT], {INPUT: images.numpy()})[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return scripted(images).numpy()


def export(cfg: DictConfig) -> Path:
    """Write the export the config asks for; check it against the PyTorch model; return its path."""
    validate_config(cfg, "export")  # a misspelt key (`+chek=false`) is refused, not ignored
    if not cfg.get("ckpt_path"):
        raise ExportError("ckpt_path is not set; pass ckpt_path=last, a run dir or a .ckpt file")
    if cfg.format not in FORMATS:
        raise ExportError(f"format={cfg.format} is not one of {', '.join(FORMATS)}")
    if cfg.format == "onnx" and (
        not isinstance(cfg.opset, int) or isinstance(cfg.opset, bool) or cfg.opset < MIN_OPSET
    ):
        raise ExportError(f"opset={cfg.opset} must be a whole number >= {MIN_OPSET} (torch's ONNX exporter's oldest)")
    if not isinstance(cfg.get("tta", False), bool):
        raise ExportError(f"tta={cfg.tta} must be true or false")
    paths = checkpoint_paths(cfg.ckpt_path, cfg.log_dir)
    net = load_model(paths, tta=cfg.get("tta", False)).net.eval()
    stem = paths[0].stem + ("_ensemble" if len(paths) > 1 else "_tta" if cfg.get("tta") else "")
    output = Path(cfg.output) if cfg.get("output") else paths[0].with_name(stem + FORMATS[cfg.format])
    if not cfg.get("output") and paths[0].parent.is_symlink():  # a checkpoints dir linked elsewhere: not beside it
        raise ExportError(f"{paths[0].parent} is a symbolic link; the export is not written beside the checkpoint "
                          "there; pass output=<file>")  # fmt: skip
    if output.is_symlink():  # e.g. planted beside a checkpoint of a run dir someone handed you
        raise ExportError(f"output={output} is a symbolic link; refusing to write through it: remove it or pass "
                          "output=<another file>")  # fmt: skip
    if output.is_dir():
        raise ExportError(f"output={output} is a directory; pass a file name, e.g. output={output}/digit.onnx")
    tmp = None
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        # A new file beside the output, renamed over it: a planted hard link is replaced, never written through.
        fd, tmp = temp_beside(output, output.suffix)
        os.close(fd)
        if cfg.format == "onnx":
            export_onnx(net, Path(tmp), cfg.opset)
        else:
            export_torchscript(net, Path(tmp))
        os.replace(tmp, output)
    except OSError as e:
        raise ExportError(f"output={output}: cannot write it ({e.strerror or e}); pass a writable path") from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    print(f"wrote {output} ({cfg.format}, {output.stat().st_size / 1e6:.1f} MB)")
    if cfg.get("check"):
        # A batch size other than the export's example (2) shows that the batch axis is dynamic.
        images = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            expected = net(images).numpy()
        got = run_exported(output, cfg.format, images)
        diff = float(np.abs(got - expected).max())
        same = bool((got.argmax(1) == expected.argmax(1)).all())
        if diff > 1e-4 or not same:
            raise ExportError(
                f"{output} disagrees with the PyTorch model (max abs diff {diff:.2e}, argmax same: {same})"
            )
        print(f"checked: {cfg.format} output matches PyTorch on a batch of 5 (max abs diff {diff:.1e})")
    return output


@hydra.main(version_base="1.3", config_path=cli.CONFIG_DIR, config_name="export")
def hydra_main(cfg: DictConfig) -> None:
    """The Hydra task: export, then check the file."""
    with cli.exit_on_user_error():
        export(cfg)


def main() -> None:
    """CLI entry point: a user error is one `error:` line, exit status 2 (see digit_lightning.cli)."""
    cli.run(hydra_main)


if __name__ == "__main__":
    main()

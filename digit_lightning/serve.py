"""Serve a model over HTTP: `python -m digit_lightning.serve ckpt_path=last` (conf/serve.yaml, docs/serving.md).

- `POST /predict`: an image file's bytes (raw, or the multipart field `image`) or a JSON 28x28 array in MNIST's form
  -> `{"digit", "probabilities", "model"}`, plus `"input"` (the 28x28 image the model saw) with `?input=true`.
  Images go through `preprocess_image`, the code path `predict` uses; arrays through its `normalize`.
- `GET /health`: the model and the batching settings; `GET /`: the drawing page (`draw.html`, shipped in the package).

Concurrent requests are batched: the first waits up to `batch_timeout` seconds for up to `max_batch_size - 1`
others, then one forward pass answers them all. `workers` processes share the listening socket, each with its own
model. Bad input is a 4xx JSON `{"error": "<what is wrong>; <the fix>"}`; the server goes on.
FastAPI + uvicorn; LitServe was tried first (docs/serving.md says why it was not kept).
"""

from __future__ import annotations

from digit_lightning import cli

cli.answer_help(__name__, "serve")  # before torch and FastAPI: help needs neither

import asyncio
import functools
import json
import multiprocessing
import os
import signal
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from importlib.resources import files
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

try:  # the serve extra; without it the package still imports, and `serve` says what to install
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.datastructures import UploadFile

    MISSING = None
except ImportError as e:
    MISSING = e.name

from digit_lightning.checkpoint import net_spec, read_checkpoint
from digit_lightning.data.mnist import MNIST_MEAN, MNIST_STD
from digit_lightning.data.preprocess import FRAME, PreprocessError, normalize, preprocess_image
from digit_lightning.ensemble import checkpoint_paths, load_model

ACCEPTED = (
    "send an image file's bytes (Content-Type image/png, image/jpeg, ... or application/octet-stream), a multipart "
    "form with the file in the field 'image' (curl -F image=@digit.png), or application/json with a 28x28 array"
)


class UsageError(cli.UserError):
    """A bad setting on the command line; one line saying which and what to pass instead."""


class RequestError(Exception):
    """A request the server cannot answer: an HTTP status and one line, `<what is wrong>; <the fix>`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def describe(paths: list[Path], tta: bool) -> dict[str, Any]:
    """The model as the API reports it: each checkpoint's net name and path, and whether TTA is on."""
    nets = [net_spec(read_checkpoint(p), p)["name"] for p in paths]
    name = nets[0] if len(nets) == 1 else f"ensemble of {len(nets)}: {', '.join(nets)}"
    return {"name": name + (" + TTA" if tta else ""), "checkpoints": [str(p) for p in paths], "tta": tta}


def read_array(body: bytes) -> torch.Tensor:
    """A JSON 28x28 array (or `{"image": array}`) of gray levels, MNIST's form: light ink on black, 0..255 or 0..1
    (an array whose largest value is at most 1), as the model's normalized 1x28x28 input."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        reason = " ".join(str(e).split())[:120]
        raise RequestError(400, f"the body is not valid JSON ({reason}); send a 28x28 array of numbers") from None
    if isinstance(data, dict):
        if "image" not in data:
            raise RequestError(400, "the JSON object has no 'image' key; send {\"image\": <28x28 array>}")
        data = data["image"]
    try:
        array = np.asarray(data, dtype=np.float64)
    except (ValueError, TypeError):
        message = "the image is not an array of numbers with rows of equal length; send 28 rows of 28 numbers"
        raise RequestError(400, message) from None
    if array.shape != (FRAME, FRAME):
        shape = "x".join(map(str, array.shape)) or "a single number"
        raise RequestError(400, f"the array's shape is {shape}, not 28x28; send other sizes as an image file")
    if not np.isfinite(array).all():
        raise RequestError(400, "the array holds NaN or infinite values; send gray levels from 0 to 255 (or 0 to 1)")
    if array.min() < 0 or array.max() > 255:
        raise RequestError(400, f"gray levels must be from 0 to 255 (or 0 to 1), not {array.min():g}..{array.max():g}")
    frame = array.astype(np.float32) / np.float32(1.0 if array.max() <= 1 else 255.0)
    return normalize(frame)


def read_image(data: bytes, max_pixels: int) -> torch.Tensor:
    """An encoded image's bytes through `predict`'s preprocessing, as the model's normalized 1x28x28 input."""
    try:
        return preprocess_image(data, max_pixels=max_pixels)
    except PreprocessError as e:
        raise RequestError(400, str(e)) from None


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, at most `limit` bytes: a larger one is read to its end but not kept (memory stays flat, and
    the client, still sending, gets the answer), then refused."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
    if size > limit:
        mib = f"{size / 2**20:.1f} MiB, over the limit of {limit / 2**20:g} MiB"
        raise RequestError(413, f"the body is {mib}; send a smaller image (the server's max_body_mb)")
    return b"".join(chunks)


async def form_image(request: Request, body: bytes) -> bytes:
    """The file in a multipart form's field `image` (the body, already read, parsed by Starlette)."""

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        async with Request(request.scope, replay).form(max_files=4, max_fields=16) as form:
            field = form.get("image")
            if field is None:
                fields = ", ".join(form.keys()) or "none"
                raise RequestError(400, f"the form has no field 'image' (it has: {fields}); send -F image=@digit.png")
            return await field.read() if isinstance(field, UploadFile) else field.encode()
    except RequestError:
        raise
    except Exception as e:  # Starlette's MultiPartException and python-multipart's errors: a malformed form
        reason = " ".join(str(e).split())[:120]
        raise RequestError(400, f"cannot parse the multipart form ({reason}); {ACCEPTED}") from None


class Batcher:
    """Batches concurrent requests: one forward pass for up to `max_batch_size` inputs that arrive within
    `batch_timeout` seconds of the first; the model runs in one thread, beside the event loop."""

    def __init__(self, model: torch.nn.Module, max_batch_size: int, batch_timeout: float) -> None:
        self.model, self.max_batch_size, self.batch_timeout = model, max_batch_size, batch_timeout
        self.queue: asyncio.Queue[tuple[torch.Tensor, asyncio.Future]] = asyncio.Queue()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.batch_sizes: list[int] = []

    async def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The ten probabilities for one normalized 1x28x28 input, computed in a batch with others."""
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((x, future))
        return await future

    @torch.inference_mode()
    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """Probabilities for a batch (the net returns log-probabilities)."""
        device = next(self.model.parameters()).device
        return self.model(batch.to(device)).exp().cpu()

    async def run(self) -> None:
        """Collect batches from the queue and answer them, until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            deadline = loop.time() + self.batch_timeout
            while len(items) < self.max_batch_size:
                if self.queue.empty() and (left := deadline - loop.time()) > 0:
                    try:
                        items.append(await asyncio.wait_for(self.queue.get(), left))
                    except asyncio.TimeoutError:
                        break
                elif not self.queue.empty():
                    items.append(self.queue.get_nowait())
                else:
                    break
            self.batch_sizes = [*self.batch_sizes[-999:], len(items)]
            try:
                probs = await loop.run_in_executor(self.executor, self.forward, torch.stack([x for x, _ in items]))
            except Exception as e:  # answer every waiting request rather than leave them hanging
                for _, future in items:
                    if not future.done():
                        future.set_exception(e)
                continue
            for (_, future), p in zip(items, probs, strict=True):
                if not future.done():  # a client that went away cancelled its future
                    future.set_result(p)


def create_app(model: torch.nn.Module, info: dict[str, Any], settings: dict[str, Any]) -> FastAPI:
    """The FastAPI app: `/predict`, `/health` and the drawing page, batching through one `Batcher`."""
    batcher = Batcher(model, settings["max_batch_size"], settings["batch_timeout"])
    preprocessing = ThreadPoolExecutor(max_workers=settings["preprocess_threads"], thread_name_prefix="preprocess")
    limit, max_pixels = int(settings["max_body_mb"] * 2**20), settings["max_pixels"]
    page = (files("digit_lightning") / "draw.html").read_text(encoding="utf-8")

    async def lifespan(app: FastAPI):
        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()
        preprocessing.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="digit_lightning", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, error: RequestError) -> JSONResponse:
        return JSONResponse({"error": str(error)}, status_code=error.status)

    @app.post("/predict")
    async def predict(request: Request) -> dict[str, Any]:
        """One digit: the most probable digit, the ten probabilities and the model; `?input=true` adds the 28x28
        image the model saw (0 background .. 1 ink)."""
        body = await read_body(request, limit)
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "multipart/form-data":
            body = await form_image(request, body)
        elif kind not in ("", "application/json", "application/octet-stream") and not kind.startswith("image/"):
            raise RequestError(415, f"the content type {kind} is not accepted; {ACCEPTED}")
        if not body:
            raise RequestError(400, f"the body is empty; {ACCEPTED}")
        loop = asyncio.get_running_loop()
        if kind == "application/json":
            x = await loop.run_in_executor(preprocessing, read_array, body)
        else:
            x = await loop.run_in_executor(preprocessing, read_image, body, max_pixels)
        probs = await batcher.predict(x)
        answer = {"digit": int(probs.argmax()), "probabilities": [round(p, 6) for p in probs.tolist()], "model": info}
        if request.query_params.get("input", "").lower() in ("1", "true", "yes"):
            seen = (x[0] * MNIST_STD + MNIST_MEAN).clamp(0, 1)
            answer["input"] = [[round(v, 3) for v in row] for row in seen.tolist()]
        return answer

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """The server is up: its model, batching settings and the sizes of its recent batches."""
        recent = batcher.batch_sizes
        return {
            "status": "ok",
            "model": info,
            "max_batch_size": batcher.max_batch_size,
            "batch_timeout": batcher.batch_timeout,
            "workers": settings["workers"],
            "pid": os.getpid(),
            "mean_batch_size": round(sum(recent) / len(recent), 2) if recent else None,
        }

    @app.get("/", response_class=HTMLResponse)
    async def draw() -> str:
        """The drawing page."""
        return page

    return app


def check_settings(cfg: DictConfig) -> dict[str, Any]:
    """Validate the command line; return the server's settings as plain data."""
    if not cfg.get("ckpt_path"):
        raise UsageError("ckpt_path is not set; pass ckpt_path=last, a run dir, a .ckpt file or '[a.ckpt,b.ckpt]'")

    def whole(key: str, low: int, high: int = 2**31) -> int:
        value = cfg[key]
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise UsageError(f"{key}={value} must be a whole number from {low} to {high}")
        return value

    def number(key: str, low: float, high: float) -> float:
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise UsageError(f"{key}={value} must be a number from {low:g} to {high:g}")
        return float(value)

    if not isinstance(cfg.tta, bool):
        raise UsageError(f"tta={cfg.tta} must be true or false")
    if cfg.device not in ("cpu", "cuda", "auto"):
        raise UsageError(f"device={cfg.device} is not one of cpu, cuda, auto")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("device=cuda but no CUDA GPU is available; use device=cpu")
    if not isinstance(cfg.host, str) or not cfg.host:
        raise UsageError(f"host={cfg.host} must be an address to listen on, e.g. 127.0.0.1 (this machine only)")
    return {
        "host": cfg.host,
        "port": whole("port", 0, 65535),
        "workers": whole("workers", 1, 64),
        "max_batch_size": whole("max_batch_size", 1, 4096),
        "batch_timeout": number("batch_timeout", 0, 10),
        "max_body_mb": number("max_body_mb", 0.001, 1024),
        "max_pixels": whole("max_pixels", 784),
        "preprocess_threads": whole("preprocess_threads", 1, 64),
        "tta": cfg.tta,
        "device": "cuda" if cfg.device == "auto" and torch.cuda.is_available() else cfg.device.replace("auto", "cpu"),
        "access_log": bool(cfg.access_log),
    }


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one), which every worker process accepts from."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        fix = "pass another port=, or port=0 for any free one"
        raise UsageError(f"cannot listen on {host}:{port} ({e.strerror}); {fix}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve_worker(
    paths: list[str], settings: dict[str, Any], sock: socket.socket, info: dict[str, Any], ready: Callable[[], Any]
) -> None:
    """One worker process (or the only one): load the model, call `ready()` once it accepts connections on `sock`,
    answer requests until stopped."""
    if settings["workers"] > 1:  # share the cores among the workers rather than oversubscribe them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // settings["workers"]))
    model = load_model([Path(p) for p in paths], tta=settings["tta"], map_location=settings["device"])
    app = create_app(model, info, settings)
    config = uvicorn.Config(app, log_level="warning", access_log=settings["access_log"], timeout_graceful_shutdown=5)
    AnnouncingServer(config, ready).run(sockets=[sock])


class AnnouncingServer(uvicorn.Server if not MISSING else object):
    """uvicorn's server, calling `ready()` once it accepts connections: the "serving ..." line is printed when every
    worker answers (a line printed while a worker still loads its model sent all first requests to the other)."""

    def __init__(self, config: Any, ready: Callable[[], Any]) -> None:
        super().__init__(config)
        self.ready = ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's startup, then `ready()` if it now accepts connections."""
        await super().startup(sockets=sockets)
        if self.started:
            self.ready()


def release(semaphore: Any) -> None:
    """Release `semaphore`: one more worker answers."""
    semaphore.release()


def serve(cfg: DictConfig) -> None:
    """Load the model, listen, print where, and serve until Ctrl-C or SIGTERM."""
    settings = check_settings(cfg)
    if MISSING:
        raise UsageError(
            f"serving needs the serve extra ({MISSING} is not installed): pip install 'digit-lightning[serve]'"
        )
    paths = checkpoint_paths(cfg.ckpt_path, cfg.log_dir)
    info = describe(paths, settings["tta"])
    load_model(paths, tta=settings["tta"])  # a bad checkpoint is one error line here, before listening
    sock = listen(settings["host"], settings["port"])
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    how = f"{settings['workers']} worker(s), batches of up to {settings['max_batch_size']}"
    line = f"serving {info['name']} on {url} ({how}): POST {url}/predict, GET {url}/health, draw at {url}/"
    args = ([str(p) for p in paths], settings, sock, info)
    if settings["workers"] == 1:
        serve_worker(*args, ready=functools.partial(print, line, flush=True))
        return
    spawn = multiprocessing.get_context("spawn")  # a fresh interpreter per worker: no forked torch thread pools
    started = spawn.Semaphore(0)
    count = settings["workers"]
    ready = functools.partial(release, started)  # `started.release` is a C method: a worker could not unpickle it
    workers = [spawn.Process(target=serve_worker, args=(*args, ready), daemon=True) for _ in range(count)]
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop the workers too, not only this process
    try:
        for worker in workers:
            worker.start()
        waiting = count
        while waiting:
            if started.acquire(timeout=1):
                waiting -= 1
            elif any(worker.exitcode is not None for worker in workers):
                raise SystemExit("error: a serve worker exited before it answered (its output is above)")
        print(line, flush=True)
        for worker in workers:
            worker.join()
    except KeyboardInterrupt:
        pass
    finally:
        for worker in workers:
            worker.terminate()
            worker.join(timeout=10)


@hydra.main(version_base="1.3", config_path=cli.CONFIG_DIR, config_name="serve")
def hydra_main(cfg: DictConfig) -> None:
    """The Hydra task: serve until stopped."""
    with cli.exit_on_user_error():
        serve(cfg)


def main() -> None:
    """CLI entry point: a usage error is one `error:` line, exit status 2 (see digit_lightning.cli)."""
    cli.run(hydra_main)


if __name__ == "__main__":
    main()

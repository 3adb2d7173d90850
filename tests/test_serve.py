"""`python -m digit_lightning.serve`: its app on a real checkpoint and real test-set images, in process (Starlette's
TestClient) for the fast tests; a real server process on 127.0.0.1 for the browser, two workers and the load test."""

from __future__ import annotations

import http.client
import importlib.util
import io
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from digit_lightning.cli import compose_config
from digit_lightning.data.mnist import MNIST_MEAN, MNIST_STD, load_mnist
from digit_lightning.data.preprocess import preprocess_image
from digit_lightning.ensemble import checkpoint_paths, load_model

ROOT = Path(__file__).resolve().parent.parent


class Server:
    """A `python -m digit_lightning.serve` process on a free port of 127.0.0.1, and a small HTTP client for it."""

    def __init__(self, *overrides: str, cwd: Path) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, "-m", "digit_lightning.serve", "port=0", *overrides]
        pipe = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
        self.process = subprocess.Popen(cmd, cwd=cwd, env=env, **pipe)
        first = self.process.stdout.readline()  # "serving <model> on http://127.0.0.1:<port> ...", or an error
        if " on http://" not in first:
            self.stop()
            raise AssertionError(f"the server did not start: {first}{self.process.stdout.read()}")
        self.port = int(first.split(" on http://127.0.0.1:")[1].split()[0])

    def request(self, method: str, path: str, body: bytes = b"", headers: dict | None = None) -> tuple[int, dict | str]:
        """One request on a new connection: the status, and the JSON answer (or the text, for a page)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            data = response.read().decode()
            is_json = response.getheader("content-type", "").startswith("application/json")
            return response.status, json.loads(data) if is_json else data
        finally:
            connection.close()

    def post(self, body: bytes, content_type: str | None, path: str = "/predict") -> tuple[int, dict]:
        """POST a body with a content type (None: no Content-Type header)."""
        return self.request("POST", path, body, {"Content-Type": content_type} if content_type else {})

    def stop(self) -> None:
        """Ctrl-C, as a user would stop it; it must exit."""
        self.process.terminate()
        self.process.wait(timeout=60)


class InProcess:
    """The app a server process runs (`serve_worker`'s model and `create_app`), answered in this process through
    Starlette's TestClient: the same requests and answers as `Server`'s, without a process start (seconds)."""

    def __init__(self, *overrides: str) -> None:
        from fastapi.testclient import TestClient

        from digit_lightning.serve import check_settings, create_app, describe

        cfg = compose_config(list(overrides), config_name="serve")
        settings = check_settings(cfg)
        paths = checkpoint_paths(cfg.ckpt_path, cfg.log_dir)
        app = create_app(load_model(paths, tta=settings["tta"]), describe(paths, settings["tta"]), settings)
        self.client = TestClient(app)
        self.client.__enter__()  # runs the app's lifespan: its batcher

    def request(self, method: str, path: str, body: bytes = b"", headers: dict | None = None) -> tuple[int, dict | str]:
        """One request: the status, and the JSON answer (or the text, for a page)."""
        response = self.client.request(method, path, content=body, headers=headers or {})
        is_json = response.headers.get("content-type", "").startswith("application/json")
        return response.status_code, response.json() if is_json else response.text

    post = Server.post  # the same bodies and headers, through this class's `request`

    def stop(self) -> None:
        """End the app's lifespan (its batcher)."""
        self.client.__exit__(None, None, None)


def png(image: Image.Image) -> bytes:
    """An image as PNG bytes."""
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=1)
    return out.getvalue()


def multipart(field: str, data: bytes, filename: str = "digit.png") -> tuple[bytes, str]:
    """A multipart/form-data body with one file field, and its content type (what `curl -F field=@file` sends)."""
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
            f"Content-Type: image/png\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


@pytest.fixture(scope="module")
def server(small_checkpoint) -> Iterator[InProcess]:
    """The app on the small checkpoint, in process, for the module's fast tests."""
    running = InProcess(f"ckpt_path={small_checkpoint[0]}")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def real_server(small_checkpoint, tmp_path_factory) -> Iterator[Server]:
    """A `python -m digit_lightning.serve` process on the small checkpoint, for the slow tests."""
    running = Server(f"ckpt_path={small_checkpoint[0]}", cwd=tmp_path_factory.mktemp("serve"))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def test_images(mnist_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The first 300 images of the official test set (uint8) and their labels."""
    images, labels = load_mnist(mnist_dir, train=False)
    return images[:300], labels[:300]


@pytest.mark.parametrize("where", ["server", pytest.param("real_server", marks=pytest.mark.slow)])
def test_test_images_as_arrays_score_what_eval_scores(
    where, request, small_checkpoint, test_images, mnist_dir, tmp_path
):
    from digit_lightning.eval import evaluate

    server = request.getfixturevalue(where)
    images, labels = test_images
    with ThreadPoolExecutor(8) as pool:  # concurrent clients: the answers come from shared batches
        answers = list(pool.map(lambda a: server.post(json.dumps(a.tolist()).encode(), "application/json"), images))
    assert all(status == 200 for status, _ in answers), answers[:3]
    served = torch.tensor([a["probabilities"] for _, a in answers])
    accuracy = float((served.argmax(dim=1) == labels).float().mean())

    cfg = compose_config(
        [f"ckpt_path={small_checkpoint[0]}", f"paths.output_dir={tmp_path}", f"paths.data_dir={mnist_dir}",
         "trainer=cpu", "data.eval_batch_size=300", "+trainer.limit_test_batches=1"],
        config_name="eval",
    )  # fmt: skip
    result = evaluate(cfg)
    assert result["num_images"] == 300
    assert accuracy == pytest.approx(result["test/acc"], abs=1e-9)
    model = load_model([small_checkpoint[0]])  # and each image's probabilities are the model's, batched or not
    with torch.no_grad():
        expected = model(images.unsqueeze(1).float().div(255).sub(MNIST_MEAN).div(MNIST_STD)).exp()
    torch.testing.assert_close(served, expected, atol=2e-6, rtol=0)
    assert answers[0][1]["model"] == {"name": "digit", "checkpoints": [str(small_checkpoint[0])], "tta": False}


def test_image_files_get_what_predict_gives(server, small_checkpoint, test_images, make_photo):
    images, labels = test_images
    rng = np.random.default_rng(0)
    model = load_model([small_checkpoint[0]])
    correct = 0
    for i in range(12):
        photo = png(make_photo(images[i].numpy(), rng))
        if i % 3 == 0:
            status, answer = server.post(*multipart("image", photo))
        else:
            status, answer = server.post(photo, "image/png" if i % 3 == 1 else None)
        assert status == 200, answer
        with torch.no_grad():  # predict's preprocessing of the same bytes, and the same model
            expected = model(preprocess_image(photo).unsqueeze(0)).exp()[0]
        assert answer["probabilities"] == pytest.approx(expected.tolist(), abs=2e-6)
        correct += answer["digit"] == int(labels[i])
    assert correct >= 10


def test_the_input_the_model_saw_comes_back_on_request(server, test_images):
    image = test_images[0][0]
    status, answer = server.post(json.dumps(image.tolist()).encode(), "application/json", "/predict?input=true")
    assert status == 200
    assert np.allclose(np.array(answer["input"]), image.numpy() / 255.0, atol=1e-3)
    assert "input" not in server.post(json.dumps({"image": image.tolist()}).encode(), "application/json")[1]


def truncated_png() -> bytes:
    data = png(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)))
    return data[: len(data) // 2]


BAD = {  # name: (body, content type, status, words the error must contain)
    "empty body": (lambda: b"", "image/png", 400, "body is empty"),
    "not an image": (lambda: b"hello, this is text" * 10, "image/png", 400, "not an image"),
    "truncated PNG": (truncated_png, "image/png", 400, "cannot decode"),
    "50 MB upload": (lambda: bytes(50 * 2**20), "image/png", 413, "over the limit"),
    "10,000x10,000 image": (lambda: png(Image.new("L", (10_000, 10_000), 255)), "image/png", 400, "too many pixels"),
    "over max_pixels": (lambda: png(Image.new("L", (5000, 3000), 255)), "image/png", 400, "5000x3000 is too many"),
    "wrong content type": (lambda: b"x" * 100, "text/plain", 415, "content type text/plain"),
    "JSON of the wrong shape": (lambda: json.dumps([[0] * 28] * 27).encode(), "application/json", 400, "27x28"),
    "JSON with NaN": (
        lambda: b"[" + b",".join([b"[" + b",".join([b"NaN"] * 28) + b"]"] * 28) + b"]",
        "application/json",
        400,
        "NaN",
    ),  # fmt: skip
    "JSON of strings": (lambda: json.dumps([["a"] * 28] * 28).encode(), "application/json", 400, "not an array"),
    "invalid JSON": (lambda: b"[[1, 2,", "application/json", 400, "not valid JSON"),
    "form without an image field": (lambda: multipart("file", b"abc")[0], "multipart", 400, "no field 'image'"),
    "blank image": (lambda: png(Image.new("L", (100, 100), 255)), "image/png", 400, "no ink"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_a_4xx_naming_it_and_the_next_request_is_answered(server, case, test_images):
    make, content_type, status, words = BAD[case]
    body = make()
    if content_type == "multipart":
        content_type = "multipart/form-data; boundary=" + body.split(b"\r\n")[0][2:].decode()
    got, answer = server.post(body, content_type)
    assert got == status, answer
    assert words in answer["error"], answer
    good = json.dumps(test_images[0][1].tolist()).encode()
    assert server.post(good, "application/json")[0] == 200


def test_health_and_the_drawing_page(server):
    status, health = server.request("GET", "/health")
    assert status == 200 and health["status"] == "ok" and health["max_batch_size"] == 16
    status, page = server.request("GET", "/")
    assert status == 200 and '<canvas id="pad"' in page and 'id="clear"' in page
    assert "http://" not in page and "https://" not in page  # nothing fetched from elsewhere: works offline


def test_bad_settings_are_refused():
    from digit_lightning.serve import UsageError, check_settings

    for override, message in [
        ("workers=0", "workers=0 must be a whole number"),
        ("port=70000", "port=70000"),
        ("batch_timeout=-1", "batch_timeout=-1"),
        ("max_batch_size=true", "max_batch_size=True"),
        ("device=tpu", "device=tpu"),
    ]:
        with pytest.raises(UsageError, match=message):
            check_settings(compose_config(["ckpt_path=x.ckpt", override], config_name="serve"))
    with pytest.raises(UsageError, match="ckpt_path is not set"):
        check_settings(compose_config([], config_name="serve"))


@pytest.mark.slow
def test_an_ensemble_with_tta_and_two_workers(small_checkpoint, test_images, tmp_path):
    ckpt = small_checkpoint[0]
    served = Server(f"ckpt_path=[{ckpt},{ckpt}]", "tta=true", "workers=2", cwd=tmp_path)
    try:
        images = test_images[0][:20]
        answers = [served.post(json.dumps(a.tolist()).encode(), "application/json")[1] for a in images]
        pids = set()
        for _ in range(400):  # whichever idle worker accepts first answers: both do within a few requests
            pids.add(served.request("GET", "/health")[1]["pid"])
            if len(pids) == 2:
                break
    finally:
        served.stop()
    assert answers[0]["model"]["name"] == "ensemble of 2: digit, digit + TTA"
    model = load_model([ckpt, ckpt], tta=True)
    with torch.no_grad():
        expected = model(images.unsqueeze(1).float().div(255).sub(MNIST_MEAN).div(MNIST_STD)).exp()
    torch.testing.assert_close(torch.tensor([a["probabilities"] for a in answers]), expected, atol=2e-6, rtol=0)
    assert len(pids) == 2  # both workers answer


@pytest.mark.slow
def test_cli_without_a_checkpoint_is_one_line_and_status_2(run_cli, tmp_path):
    result = run_cli("digit_lightning.serve", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: ckpt_path is not set; pass ckpt_path=last, a run dir, a .ckpt file or '[a.ckpt,b.ckpt]'"
    ]


def screenshot_script():
    """docs/serve_screenshot.py as a module: the strokes of the digits, and how to draw them on the page."""
    spec = importlib.util.spec_from_file_location("serve_screenshot", ROOT / "docs" / "serve_screenshot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_digits_drawn_with_the_mouse_in_chromium_are_recognized(real_server, tmp_path):
    script = screenshot_script()
    if not Path(script.CHROMIUM).exists():
        pytest.skip(f"{script.CHROMIUM} is missing; `make chromium` installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=script.CHROMIUM)
        page = browser.new_page(viewport={"width": 980, "height": 470})
        page.goto(f"http://127.0.0.1:{real_server.port}/")
        said = {digit: script.draw(page, digit) for digit in ("0", "1", "3", "4", "7")}
        bars = page.locator("#bars .prob").all_text_contents()
        seen = page.evaluate("Array.from(document.getElementById('seen').getContext('2d')"
                             ".getImageData(0, 0, 28, 28).data).filter((v, i) => i % 4 === 0)")  # fmt: skip
        page.screenshot(path=str(tmp_path / "page.png"))
        page.click("#clear")
        cleared = page.text_content("#answer"), page.locator("#bars .prob").all_text_contents()
        browser.close()
    assert said == {"0": "0", "1": "1", "3": "3", "4": "4", "7": "7"}
    assert len(bars) == 10 and max(float(b.rstrip("%")) for b in bars) == float(bars[7].rstrip("%")) > 50
    seen = np.array(seen).reshape(28, 28)  # the 28x28 image the model saw: light strokes on black
    assert seen.max() > 200 and seen[0].max() == seen[:, 0].max() == 0 and 40 < (seen > 0).sum() < 400
    assert cleared == ("", [""] * 10)


@pytest.mark.slow
def test_the_load_test_reports_no_errors_and_flat_memory(small_checkpoint):
    spec = importlib.util.spec_from_file_location("serve_load", ROOT / "bench" / "serve_load.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--ckpt", str(small_checkpoint[0]), "--clients", "2", "6", "--seconds", "4", "--batch", "4"])
    assert [(r["clients"], r["batch"]) for r in rows] == [(2, 4), (6, 4)]
    for row in rows:
        assert row["2xx"] == row["requests"] > 0 and row["4xx"] == row["5xx"] == row["failed"] == 0
        assert row["p50_ms"] <= row["p99_ms"] and row["req_per_s"] > 0
        assert row["rss_after"] < row["rss_before"] + 200  # MiB: no leak worth the name over a few hundred requests
    assert rows[-1]["mean_batch"] > 1  # six clients at once: requests were batched


@pytest.mark.slow
def test_without_the_serve_extra_it_says_what_to_install(small_checkpoint, mnist_dir, tmp_path):
    code = (  # None in sys.modules makes `import fastapi` fail, as on a core `pip install digit-lightning`
        "import sys; sys.modules['fastapi'] = None; "
        f"sys.argv = ['digit-serve', 'ckpt_path={small_checkpoint[0]}']; "
        "from digit_lightning.serve import main; main()"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: serving needs the serve extra (fastapi is not installed): pip install 'digit-lightning[serve]'"
    ]

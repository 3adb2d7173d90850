"""The drawing page with a digit drawn on it, as a PNG: `python docs/serve_screenshot.py --ckpt last [--digit 3]`.

Starts `python -m digit_lightning.serve` on a free port of 127.0.0.1, draws the digit with the mouse in headless
Chromium (Debian's `chromium` package, driven by Playwright's Python API; `make chromium` installs it), waits for
the model's answer and saves the page to `--out` (docs/images/serve_page.png). tests/test_serve.py draws with the
same strokes.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
# Mouse strokes of a few digits, as a person would draw them: lists of points on the 280x280 canvas.
STROKES: dict[str, list[list[tuple[float, float]]]] = {
    "0": [[(140 + 55 * math.sin(t * math.pi / 10), 140 - 85 * math.cos(t * math.pi / 10)) for t in range(21)]],
    "1": [[(140, 55), (140, 225)]],
    "2": [[(85, 90), (110, 58), (160, 55), (190, 90), (175, 140), (85, 222), (200, 222)]],
    "3": [
        [
            (85, 75),
            (115, 55),
            (165, 55),
            (190, 85),
            (170, 125),
            (130, 138),
            (175, 150),
            (195, 190),
            (165, 222),
            (110, 222),
            (82, 200),
        ]
    ],  # fmt: skip
    "4": [[(170, 55), (85, 165), (205, 165)], [(170, 55), (170, 225)]],
    "7": [[(80, 60), (200, 60), (120, 225)]],
}


def start_server(ckpt: str, cwd: Path | None = None) -> tuple[subprocess.Popen, str]:
    """`python -m digit_lightning.serve ckpt_path=<ckpt> port=0`; the process and its URL, once it listens."""
    cmd = [sys.executable, "-m", "digit_lightning.serve", f"ckpt_path={ckpt}", "port=0"]
    server = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = server.stdout.readline()
    if " on http://" not in first:
        server.kill()
        raise RuntimeError(f"the server did not start: {first}{server.stdout.read()}")
    return server, first.split(" on ")[1].split()[0]


def draw(page, digit: str) -> str:
    """Clear the page's canvas, draw `digit`'s strokes with the mouse, wait for the last answer; return it."""
    page.click("#clear")
    box = page.locator("#pad").bounding_box()
    for stroke in STROKES[digit]:
        page.mouse.move(box["x"] + stroke[0][0], box["y"] + stroke[0][1])
        page.mouse.down()
        for x, y in stroke[1:]:
            page.mouse.move(box["x"] + x, box["y"] + y, steps=8)
        page.mouse.up()
    page.wait_for_function("document.body.dataset.state === 'answered'", timeout=60_000)
    return page.text_content("#answer")


def main() -> None:
    """Serve the checkpoint, draw the digit, save the screenshot."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", default="last", help="ckpt_path for the server (default: last)")
    parser.add_argument("--digit", default="3", choices=sorted(STROKES))
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "serve_page.png")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    server, url = start_server(args.ckpt)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM)
            page = browser.new_page(viewport={"width": 980, "height": 470})
            page.goto(url)
            page.wait_for_function("document.getElementById('model').textContent.startsWith('model:')")
            print(f"drew a {args.digit}; the page says {draw(page, args.digit)}")
            page.screenshot(path=str(args.out))
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=60)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

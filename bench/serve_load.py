"""Load test of `python -m digit_lightning.serve` on 127.0.0.1 (`make bench-serve`; docs/serving.md).

    python bench/serve_load.py [--ckpt last] [--clients 8 32] [--seconds 30] [--batch 16] [--workers 1]

Starts the server on a free port of 127.0.0.1, then, for each client count in turn, that many concurrent clients
POST real test-set digits (28x28 PNGs, the preprocessing path) over keep-alive connections for `--seconds`, after a
2 s warm-up. Prints, with the CPU model, one row per run: requests/s, p50/p99 latency, the 4xx/5xx/failed counts,
the mean batch the server formed, and the server's memory (RSS, all its processes) before and after. `--batch 1 16`
runs each client count once per batch size (a fresh server each), to show what batching changes. The clients run on
the same machine as the server, and take CPU from it.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    """The CPU's name as /proc/cpuinfo gives it, with the number of cores this process may use."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        name = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        name = "unknown CPU"
    return f"{name}, {len(os.sched_getaffinity(0))} cores"


def rss_mib(pid: int) -> float:
    """Resident memory of a process and its children (the worker processes), in MiB, from /proc."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            total += int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS")))
            todo += [int(c) for c in Path(f"/proc/{current}/task/{current}/children").read_text().split()]
        except (OSError, StopIteration, ValueError):
            continue  # gone meanwhile
    return total / 1024


def test_pngs(n: int = 200) -> list[bytes]:
    """The first `n` test-set digits as PNG files' bytes."""
    from digit_lightning.data import prepare_mnist
    from digit_lightning.data.mnist import load_mnist

    data_dir = Path(os.environ.get("DIGIT_LIGHTNING_DATA", ROOT / "data"))
    prepare_mnist(data_dir)
    images, _ = load_mnist(data_dir, train=False)
    pngs = []
    for image in images[:n].numpy():
        out = io.BytesIO()
        Image.fromarray(image).save(out, format="PNG")
        pngs.append(out.getvalue())
    return pngs


def start_server(ckpt: str, batch: int, workers: int, png: bytes) -> tuple[subprocess.Popen, int]:
    """`python -m digit_lightning.serve` on a free port; returns the process and the port, once it listens."""
    cmd = [sys.executable, "-m", "digit_lightning.serve", f"ckpt_path={ckpt}", "port=0", f"max_batch_size={batch}",
           f"workers={workers}"]  # fmt: skip
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = server.stdout.readline()
    if " on http://127.0.0.1:" not in first:
        server.kill()
        sys.exit(f"the server did not start: {first}{server.stdout.read()}")
    port = int(first.split(" on http://127.0.0.1:")[1].split()[0])
    for _ in range(4 * workers):  # warm-up: a few first answers per worker
        post(http.client.HTTPConnection("127.0.0.1", port, timeout=120), png)
    return server, port


def post(connection: http.client.HTTPConnection, body: bytes) -> tuple[int, bytes]:
    """POST one PNG to /predict on a kept-alive connection; the status and the answer."""
    connection.request("POST", "/predict", body=body, headers={"Content-Type": "image/png"})
    response = connection.getresponse()
    return response.status, response.read()


def load(port: int, clients: int, seconds: float, pngs: list[bytes], warmup: float = 2.0) -> dict:
    """`clients` threads posting for `warmup + seconds`; latencies and statuses of the last `seconds` only."""
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + seconds
    latencies: list[list[float]] = [[] for _ in range(clients)]
    statuses: list[dict[int, int]] = [{} for _ in range(clients)]

    def client(i: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        k = i
        while (now := time.perf_counter()) < stop_at:
            try:
                status, _ = post(connection, pngs[k % len(pngs)])
            except (OSError, http.client.HTTPException):
                status = 0  # a failed connection: counted, then a new one
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            done = time.perf_counter()
            if now >= measure_from:
                latencies[i].append(done - now)
                statuses[i][status] = statuses[i].get(status, 0) + 1
            k += clients
        connection.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    times = np.array([t for per_client in latencies for t in per_client]) * 1000
    counts: dict[int, int] = {}
    for per_client in statuses:
        for status, n in per_client.items():
            counts[status] = counts.get(status, 0) + n
    return {
        "clients": clients,
        "requests": len(times),
        "req_per_s": len(times) / seconds,
        "p50_ms": float(np.percentile(times, 50)) if len(times) else float("nan"),
        "p99_ms": float(np.percentile(times, 99)) if len(times) else float("nan"),
        "2xx": sum(n for s, n in counts.items() if 200 <= s < 300),
        "4xx": sum(n for s, n in counts.items() if 400 <= s < 500),
        "5xx": sum(n for s, n in counts.items() if s >= 500),
        "failed": counts.get(0, 0),
    }


def health(port: int) -> dict:
    """The server's /health answer."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("GET", "/health")
    return json.loads(connection.getresponse().read())


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the load test the arguments describe, print a table; return its rows."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", default="last", help="ckpt_path for the server (default: last)")
    parser.add_argument("--clients", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--batch", type=int, nargs="+", default=[16], help="max_batch_size, one server each")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)

    pngs = test_pngs()
    print(f"CPU: {cpu_model()}; load average before: {os.getloadavg()[0]:.1f}", flush=True)
    header = "batch workers clients  req/s  p50 ms  p99 ms  2xx    4xx 5xx failed mean batch  RSS MiB before->after"
    print(header, flush=True)
    rows = []
    for batch in args.batch:
        server, port = start_server(args.ckpt, batch, args.workers, pngs[0])
        try:
            before = rss_mib(server.pid)
            for clients in args.clients:
                row = load(port, clients, args.seconds, pngs)
                row.update(batch=batch, workers=args.workers, rss_before=before, rss_after=rss_mib(server.pid))
                row["mean_batch"] = health(port)["mean_batch_size"]  # of the server's last 1000 batches
                rows.append(row)
                print(f"{batch:5d} {args.workers:7d} {clients:7d} {row['req_per_s']:6.0f} {row['p50_ms']:7.1f} "
                      f"{row['p99_ms']:7.1f} {row['2xx']:6d} {row['4xx']:4d} {row['5xx']:3d} {row['failed']:6d} "
                      f"{row['mean_batch']:10.1f}  {before:7.0f} -> {row['rss_after']:.0f}", flush=True)  # fmt: skip
        finally:
            server.terminate()
            server.wait(timeout=60)
    return rows


if __name__ == "__main__":
    main()

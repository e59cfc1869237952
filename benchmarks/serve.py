"""``adafuse serve`` under load, on loopback, against its baselines in the same run.

Starts a server on 127.0.0.1 over a library, then sends a fixed number of requests and stops by itself:

* ``concurrent``: ``--clients`` threads, each sending requests one after another, every request naming a random
  adapter or fusion of the library with 1-4 texts (BBC test articles), so the server gathers rows of different
  tasks into shared forward passes;
* ``one-at-a-time``: one client, one request at a time, the adapter switched per request (the server never has
  two requests to batch: what a user of one model with ``set_active_adapters`` per request gets);
* ``predict``: ``adafuse predict --task-column`` over the same rows as a file (the offline bound), loading
  included.

Prints a Markdown table and writes one JSONL record per scenario: rows/s, p50/p99 latency, the rows of each
forward pass (from ``/metrics``).

    .venv/bin/python benchmarks/serve.py --library runs/demo/sequence/library --requests 200 --out runs/serve.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(port: int, body: dict) -> float:
    data = json.dumps(body).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/predict", data, {"content-type": "application/json"}, method="POST"
    )
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=300) as response:
        json.loads(response.read())
    return time.perf_counter() - started


def _batches(port: int) -> tuple[int, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60) as response:
        lines = response.read().decode().splitlines()
    value = {line.split()[0]: float(line.split()[-1]) for line in lines if line.startswith("adafuse_batch_rows_")}
    return int(value["adafuse_batch_rows_count"]), value["adafuse_batch_rows_sum"]


def plan(names: list[str], texts: list[str], requests: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"task": rng.choice(names), "inputs": rng.sample(texts, rng.randint(1, 4))} for _ in range(requests)]


def load(port: int, bodies: list[dict], clients: int) -> dict:
    """Send ``bodies`` from ``clients`` threads; returns throughput, latency quantiles and batch sizes."""
    pending = list(enumerate(bodies))
    lock = threading.Lock()
    latencies: list[float] = []
    before = _batches(port)

    def client() -> None:
        while True:
            with lock:
                if not pending:
                    return
                _, body = pending.pop()
            seconds = _post(port, body)
            with lock:
                latencies.append(seconds)

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    after = _batches(port)
    rows = sum(len(b["inputs"]) for b in bodies)
    latencies.sort()
    passes = after[0] - before[0]
    return {
        "requests": len(bodies), "rows": rows, "clients": clients, "wall_s": round(wall, 3),
        "rows_per_s": round(rows / wall, 2), "p50_ms": round(1000 * statistics.median(latencies), 1),
        "p99_ms": round(1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 1),
        "forward_passes": passes, "rows_per_pass": round((after[1] - before[1]) / max(passes, 1), 2),
    }  # fmt: skip


def predict_file(library: Path, bodies: list[dict]) -> dict:
    """The offline bound: the same rows through ``adafuse predict --task-column`` (loading included)."""
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "rows.jsonl"
        source.write_text(
            "".join(json.dumps({"text": t, "task": b["task"]}) + "\n" for b in bodies for t in b["inputs"])
        )
        command = [sys.executable, "-m", "adafuse.continual.cli", "predict", "--library", str(library)]
        command += ["--task-column", "task", "--input", str(source), "--out", str(Path(folder) / "out.jsonl")]
        started = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        wall = time.perf_counter() - started
    rows = sum(len(b["inputs"]) for b in bodies)
    return {"requests": 1, "rows": rows, "clients": 1, "wall_s": round(wall, 3), "rows_per_s": round(rows / wall, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--library", required=True)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-batch-rows", type=int, default=64)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSONL of records")
    args = parser.parse_args(argv)

    from adafuse.fusion.library import AdapterLibrary
    from adafuse.tasks.builtin import load_builtin

    library = AdapterLibrary(args.library)
    heads = {e["name"] for e in library.entries("head")}
    names = sorted(e["name"] for e in library.entries() if e["kind"] in ("adapter", "fusion") and e["name"] in heads)
    texts = load_builtin("bbc-topic5").splits["test"].texts
    bodies = plan(names, texts, args.requests, args.seed)
    port = _free_port()
    command = [sys.executable, "-m", "adafuse.continual.cli", "serve", "--library", args.library, "--port", str(port)]
    command += ["--max-batch-rows", str(args.max_batch_rows), "--max-wait-ms", str(args.max_wait_ms)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    records = []
    try:
        for _ in range(600):
            try:
                _batches(port)
                break
            except OSError:
                time.sleep(0.2)
        load(port, plan(names, texts, min(20, args.requests), args.seed + 1), args.clients)  # warm-up: every name
        common = {"library": args.library, "names": len(names), "max_batch_rows": args.max_batch_rows,
                  "max_wait_ms": args.max_wait_ms}  # fmt: skip
        records.append({"scenario": "concurrent", **common, **load(port, bodies, args.clients)})
        records.append({"scenario": "one-at-a-time", **common, **load(port, bodies, 1)})
    finally:
        server.terminate()
        server.wait(timeout=120)
    records.append(
        {"scenario": "predict (file job)", "library": args.library, **predict_file(Path(args.library), bodies)}
    )
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in records))
    columns = ["scenario", "requests", "rows", "clients", "rows_per_s", "p50_ms", "p99_ms", "rows_per_pass"]
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for record in records:
        print("| " + " | ".join(str(record.get(c, "–")) for c in columns) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

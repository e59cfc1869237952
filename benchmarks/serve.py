"""``adafuse serve`` under load, on loopback, against its baselines in the same run.

Starts a server on 127.0.0.1 over a library, then sends a fixed number of requests and stops by itself:

* ``concurrent``: ``--clients`` threads, each sending requests one after another, every request naming a random
  adapter or fusion of the library with 1-4 texts (BBC test articles), so the server gathers rows of different
  tasks into shared forward passes;
* ``one-at-a-time``: one client, one request at a time, the adapter switched per request (the server never has
  two requests to batch: what a user of one model with ``set_active_adapters`` per request gets);
* ``predict``: ``adafuse predict --task-column`` over the same rows as a file (the offline bound), loading
  included;
* ``adapter-rows`` / ``fusion-rows``: the concurrent load with every request naming an adapter, then with every
  request naming a fusion (same rows): what a fusion row costs against an adapter row under load;
* ``half-load``: requests sent at half the concurrent scenario's measured rate (open loop,
  one thread per request), for the p99/p50 ratio below saturation;
* ``soak`` (``--soak N``): N requests of short rows (the first ``--soak-words`` words of test articles) from
  ``--clients`` threads against a copy of the library, while ``--hot-add`` adapters are imported into it
  (``adafuse library import --name hot-<i>`` of an exported one): each new name is asked for before its import
  (it must be refused) and after it (it must be served), and later requests use it. The server's RSS is read
  every second; the record holds it after warm-up (a tenth of the requests) and at the end, and the count of
  failed requests.

With ``--rounds N`` the concurrent and one-at-a-time scenarios alternate N times over the same requests, so a
slow spell of a shared machine falls on both sides of a round: each concurrent record then holds its round and
the ratio to the one-at-a-time run right after it, and the table ends with the median ratio over the rounds.

Clients keep their connection open between requests (``--connections keep-alive``, what HTTP client libraries
do), or open one per request (``--connections new``). Client and server share this machine, so each record also
holds the CPU time per row of each: the server process, and this process (the clients).

Prints a Markdown table and writes one JSONL record per scenario: rows/s, p50/p99 latency, the rows of each
forward pass (from ``/metrics``), the CPU milliseconds per row of server and clients.

    .venv/bin/python benchmarks/serve.py --library runs/demo/sequence/library --requests 200 --out runs/serve.jsonl
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_KEEP_ALIVE = threading.local()  # each client thread's open connection, when connections are kept alive
KEEP_ALIVE = [True]  # --connections keep-alive (the default) or new (one TCP connection per request)


def _post(port: int, body: dict) -> float:
    """One predict request; its latency in seconds. Raises urllib.error.HTTPError for a status other than 200."""
    data = json.dumps(body).encode()
    started = time.perf_counter()
    if KEEP_ALIVE[0]:
        status, payload = _kept_alive(port, data)
        if status != 200:
            raise urllib.error.HTTPError(f"http://127.0.0.1:{port}/v1/predict", status, payload, {}, None)
        json.loads(payload)
        return time.perf_counter() - started
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/predict", data, {"content-type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=300) as response:
        json.loads(response.read())
    return time.perf_counter() - started


def _kept_alive(port: int, data: bytes) -> tuple[int, bytes]:
    """POST ``data`` on this thread's open connection: (status, body)."""
    connection = getattr(_KEEP_ALIVE, "connection", None)
    if connection is None or connection.port != port:
        connection = _connect(port)
    try:
        return _exchange(connection, data)
    except ConnectionError:  # the server closed it while it was idle (uvicorn does after 5 s): open it again, once
        connection.close()
        return _exchange(_connect(port), data)


def _connect(port: int) -> http.client.HTTPConnection:
    _KEEP_ALIVE.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    return _KEEP_ALIVE.connection


def _exchange(connection: http.client.HTTPConnection, data: bytes) -> tuple[int, bytes]:
    connection.request("POST", "/v1/predict", data, {"content-type": "application/json"})
    response = connection.getresponse()
    return response.status, response.read()


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds process ``pid`` has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _status(port: int, body: dict) -> int:
    """The HTTP status of one predict request (errors included)."""
    try:
        _post(port, body)
        return 200
    except urllib.error.HTTPError as err:
        return err.code


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _batches(port: int) -> tuple[int, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60) as response:
        lines = response.read().decode().splitlines()
    value = {line.split()[0]: float(line.split()[-1]) for line in lines if line.startswith("adafuse_batch_rows_")}
    return int(value["adafuse_batch_rows_count"]), value["adafuse_batch_rows_sum"]


def plan(names: list[str], texts: list[str], requests: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"task": rng.choice(names), "inputs": rng.sample(texts, rng.randint(1, 4))} for _ in range(requests)]


def load(port: int, pid: int, bodies: list[dict], clients: int) -> dict:
    """Send ``bodies`` from ``clients`` threads to the server (process ``pid``); returns throughput, latency
    quantiles, batch sizes and CPU time per row."""
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

    started, cpu = time.perf_counter(), (_cpu_s(pid), _cpu_s(os.getpid()))
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    server_cpu, client_cpu = _cpu_s(pid) - cpu[0], _cpu_s(os.getpid()) - cpu[1]
    after = _batches(port)
    rows = sum(len(b["inputs"]) for b in bodies)
    latencies.sort()
    passes = after[0] - before[0]
    return {
        "requests": len(bodies), "rows": rows, "clients": clients, "wall_s": round(wall, 3),
        "rows_per_s": round(rows / wall, 2), "p50_ms": round(1000 * statistics.median(latencies), 1),
        "p99_ms": round(1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 1),
        "forward_passes": passes, "rows_per_pass": round((after[1] - before[1]) / max(passes, 1), 2),
        "server_cpu_ms_per_row": round(1000 * server_cpu / rows, 1),
        "client_cpu_ms_per_row": round(1000 * client_cpu / rows, 1),
    }  # fmt: skip


def paired_round(port: int, pid: int, bodies: list[dict], clients: int, scenarios: list[str], common: dict,
                 number: int, rounds: int) -> list[dict]:  # fmt: skip
    """The concurrent scenario, then one request at a time, over the same requests; with both, the concurrent
    record holds their ratio of rows/s."""
    tag = {"round": number} if rounds > 1 else {}
    records = []
    if "concurrent" in scenarios:
        records.append({"scenario": "concurrent", **tag, **common, **load(port, pid, bodies, clients)})
    if "one-at-a-time" in scenarios:
        records.append({"scenario": "one-at-a-time", **tag, **common, **load(port, pid, bodies, 1)})
    if len(records) == 2:
        records[0]["one_at_a_time_ratio"] = round(records[0]["rows_per_s"] / records[1]["rows_per_s"], 3)
    return records


def _same_kind(name: str, kind: str, kinds: dict[str, str], index: int) -> str:
    """``name`` if it is of ``kind``, else one of that kind's names (in turn)."""
    if kinds[name] == kind:
        return name
    of_kind = sorted(n for n, k in kinds.items() if k == kind)
    return of_kind[index % len(of_kind)]


def half_load(port: int, bodies: list[dict], rate: float) -> dict:
    """Open loop: request i starts at i / (rate / 2) seconds, whatever the answers do; latency quantiles."""
    latencies: list[float] = []
    lock = threading.Lock()

    def one(body: dict) -> None:
        seconds = _post(port, body)
        with lock:
            latencies.append(seconds)

    interval = 2 * statistics.mean(len(b["inputs"]) for b in bodies) / rate  # seconds between requests
    threads, started = [], time.perf_counter()
    for i, body in enumerate(bodies):
        time.sleep(max(0.0, started + i * interval - time.perf_counter()))
        threads.append(threading.Thread(target=one, args=(body,)))
        threads[-1].start()
    for thread in threads:
        thread.join()
    latencies.sort()
    p50, p99 = statistics.median(latencies), latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    return {
        "requests": len(bodies), "rows": sum(len(b["inputs"]) for b in bodies), "clients": "open loop",
        "rows_per_s": round(rate / 2, 2), "p50_ms": round(1000 * p50, 1), "p99_ms": round(1000 * p99, 1),
        "p99_over_p50": round(p99 / p50, 2),
    }  # fmt: skip


def soak(port: int, pid: int, library: Path, bodies: list[dict], clients: int, hot: int) -> dict:
    """``bodies`` from ``clients`` threads while ``hot`` adapters are imported; RSS sampled every second."""
    export = library.parent / "hot-export"
    from adafuse.fusion.library import AdapterLibrary

    source = sorted(e["name"] for e in AdapterLibrary(library).entries("adapter"))[0]
    cli = [sys.executable, "-m", "adafuse.continual.cli", "library"]
    subprocess.run([*cli, "export", source, "--library", str(library), "--out", str(export)], check=True,
                   capture_output=True)  # fmt: skip
    names = sorted({b["task"] for b in bodies})
    pending, landed, failures, early = list(bodies), [], [0], [0]
    lock, done = threading.Lock(), threading.Event()
    rss: list[tuple[int, float]] = []
    rng = random.Random(1)

    def client() -> None:
        while True:
            with lock:
                if not pending:
                    return
                body = pending.pop()
                if landed and rng.random() < 0.2:
                    body = {**body, "task": rng.choice(landed)}
            if _status(port, body) != 200:
                with lock:
                    failures[0] += 1

    def importer() -> None:
        for i in range(hot):
            with lock:
                left = len(pending)
            while left > len(bodies) * (1 - (i + 1) / (hot + 1)) and not done.is_set():
                time.sleep(0.2)
                with lock:
                    left = len(pending)
            name, probe = f"hot-{i}", bodies[0]["inputs"]
            if _status(port, {"task": name, "inputs": probe}) == 200:
                early[0] += 1  # served before it landed: must not happen
            subprocess.run([*cli, "import", str(export), "--library", str(library), "--name", name], check=True,
                           capture_output=True)  # fmt: skip
            if _status(port, {"task": name, "inputs": probe}) != 200:
                failures[0] += 1
            with lock:
                landed.append(name)

    def sampler() -> None:
        while not done.is_set():
            with lock:
                rss.append((len(bodies) - len(pending), _rss_mb(pid)))
            time.sleep(1.0)

    started = time.perf_counter()
    helpers = [threading.Thread(target=importer), threading.Thread(target=sampler)]
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in helpers + threads:
        thread.start()
    for thread in threads:
        thread.join()
    helpers[0].join()
    done.set()
    helpers[1].join()
    wall = time.perf_counter() - started
    warm = next(mb for sent, mb in rss if sent >= len(bodies) // 10)
    # RSS rises and falls as the server returns free pages: compare the highest sample after warm-up (10-25 % of
    # the requests sent) with the highest of the last quarter
    warm_max = max(mb for sent, mb in rss if len(bodies) // 10 <= sent <= len(bodies) // 4)
    late_max = max(mb for sent, mb in rss if sent >= len(bodies) * 3 // 4)
    return {
        "requests": len(bodies), "rows": sum(len(b["inputs"]) for b in bodies), "clients": clients,
        "wall_s": round(wall, 1), "rows_per_s": round(sum(len(b["inputs"]) for b in bodies) / wall, 2),
        "names": len(names), "hot_added": len(landed), "served_before_landing": early[0],
        "failed_requests": failures[0], "rss_warm_mb": round(warm, 1), "rss_end_mb": round(rss[-1][1], 1),
        "rss_max_mb": round(max(mb for _, mb in rss), 1), "rss_growth": round(rss[-1][1] / warm - 1, 4),
        "rss_warm_max_mb": round(warm_max, 1), "rss_late_max_mb": round(late_max, 1),
        "rss_growth_of_max": round(late_max / warm_max - 1, 4),
        "rss_series": [[sent, round(mb, 1)] for sent, mb in rss[:: max(1, len(rss) // 40)]],  # (requests sent, MB)
    }  # fmt: skip


def predict_file(library: Path, bodies: list[dict], model_flags: list[str]) -> dict:
    """The offline bound: the same rows through ``adafuse predict --task-column`` (loading included)."""
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "rows.jsonl"
        source.write_text(
            "".join(json.dumps({"text": t, "task": b["task"]}) + "\n" for b in bodies for t in b["inputs"])
        )
        command = [sys.executable, "-m", "adafuse.continual.cli", "predict", "--library", str(library)]
        command += ["--task-column", "task", "--input", str(source), "--out", str(Path(folder) / "out.jsonl")]
        command += model_flags
        started = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        wall = time.perf_counter() - started
    rows = sum(len(b["inputs"]) for b in bodies)
    return {"requests": 1, "rows": rows, "clients": 1, "wall_s": round(wall, 3), "rows_per_s": round(rows / wall, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--library", required=True)
    choices = "concurrent, one-at-a-time, adapter-rows, fusion-rows, half-load (after concurrent), predict, soak"
    parser.add_argument("--scenarios", default="concurrent,one-at-a-time,predict", help=f"comma-separated: {choices}")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-batch-rows", type=int, default=64)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--soak", type=int, default=20000, help="requests of the soak scenario")
    parser.add_argument("--soak-words", type=int, default=32, help="words per row in the soak scenario")
    parser.add_argument("--hot-add", type=int, default=20, help="adapters imported during the soak")
    parser.add_argument("--release-every", type=int, default=1, help="the server's --release-every (0: never)")
    parser.add_argument("--backbone", help="the server's and predict's --backbone (e.g. a YAML with dtype: bfloat16)")
    parser.add_argument("--device", default="cpu", help="the server's and predict's --device (cpu, cuda)")
    parser.add_argument("--precision", default="32", help="the server's and predict's --precision (32, bf16-mixed)")
    parser.add_argument("--connections", choices=("keep-alive", "new"), default="keep-alive",
                        help="each client keeps its connection open (as HTTP client libraries do), or opens one per "
                        "request")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=1,
                        help="concurrent and one-at-a-time alternated this many times (ratio per round)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSONL of records")
    args = parser.parse_args(argv)
    scenarios = args.scenarios.split(",")
    KEEP_ALIVE[0] = args.connections == "keep-alive"

    from adafuse.fusion.library import AdapterLibrary
    from adafuse.tasks.builtin import load_builtin

    library = AdapterLibrary(args.library)
    heads = {e["name"] for e in library.entries("head")}
    names = sorted(e["name"] for e in library.entries() if e["kind"] in ("adapter", "fusion") and e["name"] in heads)
    texts = load_builtin("bbc-topic5").splits["test"].texts
    bodies = plan(names, texts, args.requests, args.seed)
    common = {"library": args.library, "names": len(names), "max_batch_rows": args.max_batch_rows,
              "max_wait_ms": args.max_wait_ms, "release_every": args.release_every,
              "backbone": args.backbone or "the library's", "connections": args.connections,
              "device": args.device, "precision": args.precision}  # fmt: skip
    model_flags = ["--backbone", args.backbone] if args.backbone else []
    model_flags += ["--device", args.device, "--precision", args.precision]  # the server's and predict's
    records = []
    with tempfile.TemporaryDirectory() as scratch:
        copy = Path(scratch) / "library"  # the soak imports into it; the library itself is only read
        shutil.copytree(args.library, copy, ignore=shutil.ignore_patterns("*.lock", ".lock"))
        port = _free_port()
        command = [sys.executable, "-m", "adafuse.continual.cli", "serve", "--library", str(copy), "--port", str(port)]
        command += ["--max-batch-rows", str(args.max_batch_rows), "--max-wait-ms", str(args.max_wait_ms)]
        command += ["--release-every", str(args.release_every), *model_flags]
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            for _ in range(600):
                try:
                    _batches(port)
                    break
                except OSError:
                    time.sleep(0.2)
            load(
                port, server.pid, plan(names, texts, min(20, args.requests), args.seed + 1), args.clients
            )  # warm-up: every name
            for number in range(1, args.rounds + 1):
                records += paired_round(port, server.pid, bodies, args.clients, scenarios, common, number, args.rounds)
            kinds = {e["name"]: e["kind"] for e in library.entries() if e["kind"] in ("adapter", "fusion")}
            for kind in ("adapter", "fusion"):
                if f"{kind}-rows" in scenarios:
                    only = [{**b, "task": _same_kind(b["task"], kind, kinds, i)} for i, b in enumerate(bodies)]
                    records.append({"scenario": f"{kind}-rows", **common, **load(port, server.pid, only, args.clients)})
            saturated = [r["rows_per_s"] for r in records if r["scenario"] == "concurrent"]
            if "half-load" in scenarios and saturated:
                rate = statistics.median(saturated)
                records.append({"scenario": "half-load", **common, **half_load(port, bodies, rate)})
            if "soak" in scenarios:
                short = [" ".join(t.split()[: args.soak_words]) for t in texts]
                many = plan(names, short, args.soak, args.seed + 2)
                result = soak(port, server.pid, copy, many, args.clients, args.hot_add)
                records.append({"scenario": "soak", **common, **result})
        finally:
            server.terminate()
            server.wait(timeout=120)
    if "predict" in scenarios:
        bound = predict_file(Path(args.library), bodies, model_flags)
        records.append(
            {"scenario": "predict (file job)", "library": args.library, "backbone": common["backbone"], **bound}
        )
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in records))
    columns = ["scenario", "round", "requests", "rows", "clients", "rows_per_s", "one_at_a_time_ratio", "p50_ms"]
    columns += ["p99_ms", "rows_per_pass", "server_cpu_ms_per_row", "client_cpu_ms_per_row"]
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for record in records:
        print("| " + " | ".join(str(record.get(c, "–")) for c in columns) + " |")
    ratios = [r["one_at_a_time_ratio"] for r in records if "one_at_a_time_ratio" in r]
    if len(ratios) > 1:
        print(f"concurrent / one-at-a-time over {len(ratios)} rounds: median {statistics.median(ratios):.3f} "
              f"(min {min(ratios):.3f}, max {max(ratios):.3f})")  # fmt: skip
    for record in records:
        if record["scenario"] == "soak":
            print(json.dumps({k: v for k, v in record.items() if k not in common}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

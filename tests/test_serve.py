"""``adafuse serve``: a real server process on 127.0.0.1, started and stopped by the tests, answering as
``adafuse predict`` does, batching across requests and tasks, serving what the library gains, refusing bad input
with 4xx and keeping on serving."""

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from cli_process import free_port, run_cli
from conftest import load_script

from adafuse.continual.cli import main
from adafuse.continual.jobs.predict import run_predict
from adafuse.continual.jobs.serve import ServeOptions, Server
from adafuse.fusion.widen import cpu_has_bf16

pytestmark = pytest.mark.xdist_group("serve")  # one library and one server process, on one xdist worker
ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "sequence" / "smoke.yaml")
TOKEN = "s3cret"
TEXTS = ["Shares rose sharply on the stock market", "The striker scored twice in the final", "A new phone", "x y z"]


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    out = tmp_path_factory.mktemp("serve") / "run"
    quick = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2"]
    assert main(["run", SMOKE, "--out", str(out), "--tasks", "[bbc-business, bbc-sports]", *quick]) == 0
    fuse = [str(ROOT / "configs" / "fusion" / "smoke.yaml"), "--library", str(out / "library")]
    assert main(["fuse", *fuse, "--out", str(out / "fusion"), "--trainer.max_epochs", "1"]) == 0
    return out / "library"


class Served:
    def __init__(self, library: Path, *extra: str) -> None:
        self.port = free_port()
        command = [sys.executable, "-m", "adafuse.continual.cli", "serve", "--library", str(library)]
        command += ["--port", str(self.port), "--token", TOKEN, "--max-wait-ms", "50", "--max-chars", "500"]
        command += ["--max-loaded", "2", *extra]  # fewer than the tests ask for: they run through the LRU
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the server ended: {self.process.stderr.read()[-2000:]}")
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
        raise AssertionError("the server did not answer /health within 120 s")

    def request(self, method: str, path: str, body: bytes | None = None, token: str | None = TOKEN):
        headers = {"content-type": "application/json"} | ({"authorization": f"Bearer {token}"} if token else {})
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", body, headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()

    def get(self, path: str, **options):
        return self.request("GET", path, **options)

    def predict(self, body, **options):
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        status, text = self.request("POST", "/v1/predict", raw, **options)
        return status, json.loads(text)

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


@pytest.fixture(scope="module")
def server(library):
    served = Served(library)
    yield served
    if served.process.poll() is None:
        served.process.kill()
        served.process.wait()


_PREDICTED: dict[str, list[dict]] = {}


def _predicted(library: Path, tmp_path: Path, rows: list[dict], **which) -> list[dict]:
    """What ``adafuse predict`` writes for the same rows (each distinct question asked once)."""
    key = json.dumps([str(library), rows, sorted(which.items())])
    if key not in _PREDICTED:
        source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
        source.write_text("".join(json.dumps(row) + "\n" for row in rows))
        run_predict(library, source, out, max_length=128, **which)
        _PREDICTED[key] = [json.loads(line) for line in out.read_text().splitlines()]
    return _PREDICTED[key]


def test_answers_exactly_what_predict_writes(server, library, tmp_path):
    rows = [{"text": t} for t in TEXTS]
    for key, name in (("adapter", "bbc-business"), ("fusion", "bbc-topic5-fewshot-fusion"), ("task", "bbc-sports")):
        status, body = server.predict({key: name, "inputs": TEXTS})
        which = {"fusion": name} if key == "fusion" else {"adapter": name}
        assert status == 200 and body["outputs"] == _predicted(library, tmp_path, rows, **which), key
    mixed = [
        {"text": t, "task": n}
        for t, n in zip(TEXTS, ["bbc-sports", "bbc-business", "bbc-sports", "bbc-business"], strict=True)
    ]
    status, body = server.predict({"rows": [{"task": r["task"], "input": r["text"]} for r in mixed]})
    assert status == 200 and body["outputs"] == _predicted(library, tmp_path, mixed, task_column="task")


def test_concurrent_requests_for_different_tasks_share_forward_passes(server, library, tmp_path):
    names = ["bbc-business", "bbc-sports", "bbc-topic5-fewshot-fusion", "bbc-business"] * 3
    expected = {}
    for name in set(names):
        which = {"fusion": name} if "fusion" in name else {"adapter": name}
        expected[name] = _predicted(library, tmp_path, [{"text": TEXTS[0]}], **which)
    before = _batches(server)
    answers = {}

    def ask(index: int, name: str) -> None:
        answers[index] = server.predict({"task": name, "inputs": [TEXTS[0]]})

    threads = [threading.Thread(target=ask, args=(i, n)) for i, n in enumerate(names)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for index, name in enumerate(names):  # in a batch with other rows, padded to their length: the same to 1e-5
        status, body = answers[index]
        (got,), (want,) = body["outputs"], expected[name]
        assert status == 200 and got["label"] == want["label"], (name, got, want)
        assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-5)
    assert _batches(server) - before < len(names)  # requests were gathered into shared passes


def _batches(server) -> int:
    status, text = server.get("/metrics")
    assert status == 200
    return int(next(line.split()[-1] for line in text.splitlines() if line.startswith("adafuse_batch_rows_count")))


@pytest.mark.parametrize(
    "body,status,match",
    [
        (b"{not json", 422, "malformed JSON body"),
        ({"adapter": "bbc-weather", "inputs": ["x"]}, 404, "no adapter named 'bbc-weather'"),
        ({"fusion": "bbc-business", "inputs": ["x"]}, 404, "no fusion named 'bbc-business'"),
        ({"adapter": "bbc-business", "inputs": []}, 422, "no inputs"),
        ({"adapter": "bbc-business", "inputs": [""]}, 422, "input 1 is empty"),
        ({"adapter": "bbc-business", "inputs": ["x" * 501]}, 413, "input 1 has 501 characters; at most 500"),
        ({"adapter": "bbc-business", "inputs": ["x"] * 257}, 413, "257 inputs in one request; at most 256"),
        ({"adapter": "bbc-business", "inputs": [5]}, 422, "inputs.0"),
        ({"adapter": "bbc-business", "fusion": "x", "inputs": ["x"]}, 422, "exactly one of"),
        ({"inputs": ["x"], "colour": "red"}, 422, "colour: Extra inputs are not permitted"),
    ],
)
def test_bad_input_is_a_4xx_naming_the_problem_and_the_server_keeps_serving(server, body, status, match):
    got, answer = server.predict(body)
    assert got == status and match in answer["error"], answer
    assert server.predict({"adapter": "bbc-business", "inputs": ["still here"]})[0] == 200


def test_at_most_max_loaded_stay_loaded_and_an_unloaded_one_comes_back(server, library, tmp_path):
    for name in ("bbc-business", "bbc-topic5-fewshot-fusion", "bbc-sports", "bbc-business"):
        assert server.predict({"task": name, "inputs": [TEXTS[1]]})[0] == 200
        loaded = json.loads(server.get("/health")[1])["loaded"]
        assert len(loaded) <= 2 and loaded[-1] == name  # the least recently used go first
    status, body = server.predict({"fusion": "bbc-topic5-fewshot-fusion", "inputs": [TEXTS[1]]})
    want = _predicted(library, tmp_path, [{"text": TEXTS[1]}], fusion="bbc-topic5-fewshot-fusion")
    assert status == 200 and body["outputs"] == want


def test_every_request_needs_the_token(server):
    assert server.get("/health", token=None)[0] == 401
    assert server.predict({"adapter": "bbc-business", "inputs": ["x"]}, token="wrong")[0] == 401


def test_library_health_and_metrics(server, library):
    status, text = server.get("/v1/library")
    entries = json.loads(text)["entries"]
    assert status == 200 and {(e["kind"], e["name"]) for e in entries} >= {
        ("adapter", "bbc-business"),
        ("fusion", "bbc-topic5-fewshot-fusion"),
    }
    head = next(e for e in entries if e["kind"] == "head" and e["name"] == "bbc-business")
    assert head["labels"] == ["not-business", "business"] and head["sha256"]
    metrics = server.get("/metrics")[1]
    assert 'adafuse_requests_total{status="200"}' in metrics and 'adafuse_rows_total{name="bbc-business"}' in metrics
    assert "adafuse_request_latency_seconds_bucket" in metrics


def test_new_adapters_are_served_without_a_restart_and_a_changed_one_is_refused(server, library, tmp_path):
    assert server.predict({"adapter": "bbc-tech", "inputs": ["x"]})[0] == 404
    quick = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2"]
    added = ["--tasks", "[bbc-tech, bbc-politics]", *quick]
    assert main(["run", SMOKE, "--out", str(tmp_path / "more"), "--library", str(library), *added]) == 0
    status, body = server.predict({"adapter": "bbc-tech", "inputs": [TEXTS[2]]})
    assert status == 200 and body["outputs"] == _predicted(library, tmp_path, [{"text": TEXTS[2]}], adapter="bbc-tech")
    # an adapter whose file no longer matches its manifest entry: refused (409) when first asked for
    target = library / "adapters" / "bbc-politics.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    status, body = server.predict({"adapter": "bbc-politics", "inputs": ["x"]})
    assert status == 409 and "bbc-politics" in body["error"]
    assert server.predict({"adapter": "bbc-business", "inputs": ["x"]})[0] == 200


def test_a_public_address_needs_a_token(library):
    result = run_cli("serve", "--library", str(library), "--host", "0.0.0.0", env={"ADAFUSE_SERVE_TOKEN": ""})
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "'0.0.0.0' (not loopback) needs a bearer token" in lines[0]


def test_bf16_autocast_answers_what_predict_writes_with_it(library, tmp_path):
    """``--precision bf16-mixed`` on both sides: the server's batcher (in this process: the HTTP side is the one the
    tests above use) answers the same rows with the same outputs as ``predict``, which differ from float32's;
    where the CPU has no bf16 instructions the server refuses it in one line before loading anything."""
    if not cpu_has_bf16():
        result = run_cli("serve", "--library", str(library), "--precision", "bf16-mixed")
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and "needs a CPU with bf16 instructions" in lines[0]
        return
    name, rows = "bbc-topic5-fewshot-fusion", [{"text": t} for t in TEXTS]
    served = Server(ServeOptions(library, precision="bf16-mixed"))
    try:
        outputs = served.batcher.submit(TEXTS, [name] * len(TEXTS)).result(timeout=120)
    finally:
        served.batcher.stop()
    narrow = _predicted(library, tmp_path, rows, fusion=name, precision="bf16-mixed")
    assert json.loads(json.dumps(outputs)) == narrow != _predicted(library, tmp_path, rows, fusion=name)


def test_16_mixed_on_a_cpu_is_refused_in_one_line(library, capsys):
    assert main(["serve", "--library", str(library), "--precision", "16-mixed"]) == 2  # before anything loads
    assert capsys.readouterr().err.strip().splitlines() == [
        "adafuse: error: --precision 16-mixed needs a CUDA device (--device cuda); on a CPU use bf16-mixed or 32"
    ]


def test_a_negative_release_interval_is_refused(library):
    result = run_cli("serve", "--library", str(library), "--release-every", "-1")
    lines = result.stderr.strip().splitlines()
    expected = "adafuse: error: serve: --release-every -1: expected >= 0 (0: off)"
    assert result.returncode == 2 and lines == [expected], lines


def test_sigterm_finishes_and_exits_zero(server):
    assert server.stop() == 0  # a graceful stop: uvicorn lets the requests in flight finish


def test_the_guard_answers_a_bug_with_500_and_one_line_and_counts_every_request(capsys):
    """The ASGI middleware alone: a token check, a bug in a handler answered with one line, statuses counted."""
    import asyncio
    from types import SimpleNamespace

    from adafuse.continual.jobs.serve import _Guard
    from adafuse.continual.jobs.serve_metrics import ServeMetrics

    async def broken(scope, receive, send):
        raise KeyError("oops")

    async def fine(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    def call(app, headers):
        messages = []

        async def send(message):
            messages.append(message)

        server = SimpleNamespace(options=SimpleNamespace(token=TOKEN), metrics=ServeMetrics())
        asyncio.run(_Guard(app, server)({"type": "http", "headers": headers}, None, send))
        return messages[0]["status"], b"".join(m.get("body", b"") for m in messages[1:]), server.metrics

    authorized = [(b"authorization", f"Bearer {TOKEN}".encode())]
    status, body, metrics = call(broken, authorized)
    assert status == 500 and json.loads(body) == {"error": "internal error: KeyError: 'oops'"}
    assert capsys.readouterr().err == "adafuse serve: internal error: KeyError: 'oops'\n"
    assert 'adafuse_requests_total{status="500"} 1' in metrics.text()
    status, body, metrics = call(fine, [(b"authorization", b"Bearer wrong")])
    assert status == 401 and "bearer token" in json.loads(body)["error"]
    assert 'adafuse_requests_total{status="401"} 1' in metrics.text()
    assert call(fine, authorized)[0] == 200


def test_the_load_benchmark_runs_against_a_real_server(library, tmp_path):
    """benchmarks/serve.py, bounded: 8 requests from 2 clients and one at a time against a server it starts on a
    free loopback port and stops; each record names the device and precision it ran with."""
    script = load_script(ROOT / "benchmarks" / "serve.py")
    out = tmp_path / "serve.jsonl"
    args = ["--library", str(library), "--scenarios", "concurrent,one-at-a-time", "--requests", "8", "--clients", "2"]
    assert script.main([*args, "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["scenario"] for r in records] == ["concurrent", "one-at-a-time"]
    for record in records:
        assert record["requests"] == 8 and record["rows_per_s"] > 0
        assert record["device"] == "cpu" and record["precision"] == "32"

"""``adafuse serve``: one frozen backbone answering for every adapter and fusion of a library over HTTP.

FastAPI validates the requests (and publishes their schema at ``/docs`` and ``/openapi.json``); uvicorn serves
them. One model thread owns the model: a batcher gathers the rows of concurrent requests, whatever adapter or
fusion each names, up to ``max_batch_rows`` rows or ``max_wait_ms``, runs them through one routed forward pass of
the same :class:`Predictor` that ``adafuse predict`` uses, and answers each request with its own rows, exactly as
``predict`` writes them. The HTTP side never touches tensors.

The library is read at every request, so adapters and fusions that a run or an import adds are served without a
restart; each is verified (sha256, backbone fingerprint, a fusion's sources) when it is first loaded, and one that
fails is refused with 409 while the rest keep serving. Nothing here writes to the library. The server binds
127.0.0.1 unless told otherwise, and refuses another address without a bearer token.

Endpoints: ``POST /v1/predict``, ``GET /v1/library``, ``GET /health``, ``GET /metrics`` (Prometheus text).
"""

import asyncio
import contextlib
import ipaddress
import os
import queue
import signal
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from adafuse.continual.jobs.library_model import LibraryModel
from adafuse.continual.jobs.predictor import Predictor, autocast_dtype, device_for
from adafuse.continual.jobs.serve_metrics import ServeMetrics
from adafuse.continual.runtime.allocator import release_free_memory
from adafuse.fusion.errors import UserError, VerificationError, first_line
from adafuse.tasks.types import TASK_TYPES

TOKEN_VARIABLE = "ADAFUSE_SERVE_TOKEN"
TEXT_TYPES = tuple(name for name, kind in TASK_TYPES.items() if kind.inputs == "text")  # what JSON rows carry


@dataclass
class ServeOptions:
    library: Path
    host: str = "127.0.0.1"
    port: int = 8080
    device: str = "cpu"
    precision: str = "32"  # the forward passes' autocast (adafuse.continual.jobs.predictor.PRECISIONS)
    max_batch_rows: int = 64
    max_wait_ms: float = 5.0
    max_rows: int = 256  # rows one request may send
    max_chars: int = 20_000  # characters of one input (its tokens are truncated at max_length anyway)
    max_length: int = 128
    max_loaded: int = 32  # adapters and fusions kept loaded (least recently used unloaded first); 0: no limit
    release_every: int = 1  # forward passes between returns of malloc's free pages to the OS; 0: never
    token: str | None = None
    backbone: str | None = None

    def check(self) -> None:
        """Refuse options that cannot work, in one line each, before anything loads."""
        for name, zero in (("max_loaded", "no limit"), ("release_every", "off")):
            if getattr(self, name) < 0:
                raise UserError(f"serve: --{name.replace('_', '-')} {getattr(self, name)}: expected >= 0 (0: {zero})")
        for name in ("max_batch_rows", "max_rows", "max_chars", "max_length"):
            if getattr(self, name) < 1:
                raise UserError(f"serve: --{name.replace('_', '-')} {getattr(self, name)}: expected >= 1")
        if self.max_wait_ms < 0 or not 0 <= self.port <= 65535:
            raise UserError(f"serve: --max-wait-ms {self.max_wait_ms} / --port {self.port} out of range")
        if not _loopback(self.host) and not self.token:
            raise UserError(
                f"serve: binding '{self.host}' (not loopback) needs a bearer token: --token or {TOKEN_VARIABLE}"
            )


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class RequestError(Exception):
    """A request the server refuses: its HTTP status and one line saying why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class _Job:
    texts: list
    tasks: list[str]
    future: Future


class Batcher:
    """The model thread: gathers queued jobs into one forward pass; a job that breaks a pass is answered alone."""

    def __init__(self, predictor: Predictor, options: ServeOptions, metrics: ServeMetrics) -> None:
        self.predictor = predictor
        self.options = options
        self.metrics = metrics
        self.queue: queue.Queue[_Job | None] = queue.Queue()
        self.passes = 0
        self.thread = threading.Thread(target=self._loop, name="adafuse-model", daemon=True)
        self.thread.start()

    def submit(self, texts: list, tasks: list[str]) -> Future:
        future: Future = Future()
        self.queue.put(_Job(texts, tasks, future))
        return future

    def stop(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=60)

    def _loop(self) -> None:
        while (job := self.queue.get()) is not None:
            jobs, rows = [job], len(job.texts)
            deadline = time.monotonic() + self.options.max_wait_ms / 1000
            while rows < self.options.max_batch_rows and (left := deadline - time.monotonic()) > 0:
                try:
                    more = self.queue.get(timeout=left)
                except queue.Empty:
                    break
                if more is None:
                    self.queue.put(None)  # stop after this batch
                    break
                jobs.append(more)
                rows += len(more.texts)
            answers = self._run(jobs)
            self.predictor.trim(self.options.max_loaded)  # after the pass (it may need more than the limit)
            for future, result, failed in answers:  # and before the answers: a request sees the trimmed state
                future.set_exception(result) if failed else future.set_result(result)
            self.passes += 1
            if self.options.release_every and self.passes % self.options.release_every == 0:  # no request waits
                release_free_memory()

    def _run(self, jobs: list[_Job]) -> list[tuple[Future, object, bool]]:
        """(future, outputs or exception, failed) per job."""
        answers, ready = [], []
        for job in jobs:  # load what is new; each is verified as it loads, and a failure fails its request only
            try:
                for task in dict.fromkeys(job.tasks):
                    self.predictor.add_task(task)
                ready.append(job)
            except Exception as err:  # noqa: BLE001 - handed to the request that asked for it
                answers.append((job.future, err, True))
        if not ready:
            return answers
        texts = [text for job in ready for text in job.texts]
        tasks = [task for job in ready for task in job.tasks]
        try:
            outputs = self.predictor(texts, tasks)
        except Exception:  # noqa: BLE001 - one request's rows broke the shared pass: answer each request alone
            return answers + [self._run_alone(job) for job in ready]
        self.metrics.batch(tasks)
        start = 0
        for job in ready:
            answers.append((job.future, outputs[start : start + len(job.texts)], False))
            start += len(job.texts)
        return answers

    def _run_alone(self, job: _Job) -> tuple[Future, object, bool]:
        try:
            outputs = self.predictor(job.texts, job.tasks)
        except Exception as err:  # noqa: BLE001 - handed to the request
            return job.future, err, True
        self.metrics.batch(job.tasks)
        return job.future, outputs, False


class Server:
    """The library, its model and the batcher behind the HTTP app."""

    def __init__(self, options: ServeOptions) -> None:
        options.check()
        self.options = options
        device = device_for(options.device)
        autocast = autocast_dtype(options.precision, device)  # refused before the backbone loads
        self.opened = LibraryModel.open(options.library, options.backbone, device=device)
        self.metrics = ServeMetrics()
        predictor = Predictor(self.opened, options.max_length, device, 0, autocast)
        self.batcher = Batcher(predictor, options, self.metrics)

    def rows(self, body: dict) -> tuple[list, list[str], bool]:
        """(inputs, the adapter or fusion of each, whether the rows name their own) of a predict request."""
        names = {key: body.get(key) for key in ("adapter", "fusion", "task") if body.get(key) is not None}
        entries = {(e["kind"], e["name"]): e for e in self.opened.library.entries()}  # the library as it is now
        if body.get("rows") is not None:
            if names or body.get("inputs") is not None:
                raise RequestError(422, "give either 'rows' or one of 'adapter', 'fusion', 'task' with 'inputs'")
            texts, tasks = [r["input"] for r in body["rows"]], [r["task"] for r in body["rows"]]
            for task in dict.fromkeys(tasks):
                _check_name(entries, task, None)
            return texts, tasks, True
        if len(names) != 1 or body.get("inputs") is None:
            raise RequestError(422, "give exactly one of 'adapter', 'fusion', 'task', with 'inputs' (or 'rows')")
        (key, name), texts = next(iter(names.items())), body["inputs"]
        _check_name(entries, name, None if key == "task" else key)
        return texts, [name] * len(texts), False

    def check_inputs(self, texts: list) -> None:
        if not texts:
            raise RequestError(422, "no inputs: expected at least one")
        if len(texts) > self.options.max_rows:
            raise RequestError(413, f"{len(texts)} inputs in one request; at most {self.options.max_rows}")
        for number, text in enumerate(texts, 1):
            size = len(text) if isinstance(text, str) else sum(len(w) for w in text)
            if size == 0:
                raise RequestError(422, f"input {number} is empty")
            if size > self.options.max_chars:
                raise RequestError(413, f"input {number} has {size} characters; at most {self.options.max_chars}")

    def library_entries(self) -> list[dict]:
        keep = ("name", "kind", "task", "sha256", "metrics", "created")
        entries = []
        for entry in self.opened.library.entries():
            config = entry.get("config", {})
            extra = {"task_type": config.get("task_type"), "labels": config.get("label_names")}
            entries.append({k: entry.get(k) for k in keep} | {k: v for k, v in extra.items() if v is not None})
        return entries


def _check_name(entries: dict[tuple[str, str], dict], name: str, kind: str | None) -> None:
    """Refuse a name that is not an adapter or fusion (``kind``: that one) with a head, or not a text task."""
    found = [k for k in ("adapter", "fusion") if kind in (None, k) and (k, name) in entries]
    head = entries.get(("head", name))
    if not found or head is None:
        heads = sorted(n for k, n in entries if k == "head")
        what = kind or "adapter or fusion"
        raise RequestError(404, f"no {what} named '{name}' with a head in the library (has: {heads})")
    task_type = head["config"].get("task_type", "classification")
    if task_type not in TEXT_TYPES:
        raise RequestError(422, f"'{name}' is a {task_type} task; the server takes {', '.join(TEXT_TYPES)}")


class _Guard:
    """ASGI middleware around every request: the bearer token, the request metrics, and a bug answered with 500 and
    one line while the server lives on. Plain ASGI rather than Starlette's ``BaseHTTPMiddleware``, which runs each
    request through an extra task and stream."""

    def __init__(self, app, server: Server) -> None:
        self.app = app
        self.server = server
        token = server.options.token
        self.authorization = f"Bearer {token}".encode() if token else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [0]

        async def sent(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        if self.authorization and dict(scope["headers"]).get(b"authorization") != self.authorization:
            await _error(401, "missing or wrong bearer token (Authorization: Bearer TOKEN)")(scope, receive, sent)
        else:
            try:
                await self.app(scope, receive, sent)
            except Exception as err:  # noqa: BLE001 - a bug: one line, the server lives on
                line = f"internal error: {type(err).__name__}: {first_line(err)}"
                print(f"adafuse serve: {line}", file=sys.stderr)
                if not status[0]:  # nothing sent yet
                    await _error(500, line)(scope, receive, sent)
        self.server.metrics.request(status[0] or 500, time.perf_counter() - started)


def _error(status: int, message: str):
    """``{"error": message}`` with ``status``: how every refusal and failure answers (an ASGI app itself)."""
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status)


def build_app(server: Server):
    from importlib.metadata import version

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import PlainTextResponse
    from pydantic import BaseModel, ConfigDict

    class Row(BaseModel):
        model_config = ConfigDict(extra="forbid")
        task: str
        input: str | list[str]

    class PredictRequest(BaseModel):
        """Either ``adapter``, ``fusion`` or ``task`` (either kind) with ``inputs``, or ``rows`` that each name their
        own; an input is a text, or (tagging) a list of words."""

        model_config = ConfigDict(extra="forbid")
        adapter: str | None = None
        fusion: str | None = None
        task: str | None = None
        inputs: list[str | list[str]] | None = None
        rows: list[Row] | None = None

    app = FastAPI(title="adafuse serve", version=version("adafuse"), description=__doc__.split("\n\n")[0])

    app.add_middleware(_Guard, server=server)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, err: RequestValidationError):
        problem = err.errors()[0] if err.errors() else {}
        if problem.get("type") == "json_invalid":
            return _error(422, f"malformed JSON body: {problem.get('msg')} at character {problem['loc'][-1]}")
        where = ".".join(str(p) for p in problem.get("loc", ()) if p != "body") or "body"
        return _error(422, f"{where}: {problem.get('msg', 'invalid request')}")

    @app.post("/v1/predict")
    async def predict(body: PredictRequest):
        try:
            texts, tasks, per_row = server.rows(body.model_dump(exclude_none=True))
            server.check_inputs(texts)
            outputs = await asyncio.wrap_future(server.batcher.submit(texts, tasks))
        except RequestError as err:
            return _error(err.status, str(err))
        except VerificationError as err:
            print(f"adafuse serve: refused: {err}", file=sys.stderr)
            return _error(409, f"verification failed: {err}")
        except UserError as err:
            return _error(422, str(err))
        if per_row:
            outputs = [{"task": task, **output} for task, output in zip(tasks, outputs, strict=True)]
        return {"outputs": outputs}

    @app.get("/v1/library")
    async def library():
        return {"library": str(server.opened.library.root), "backbone": server.opened.fingerprint,
                "entries": server.library_entries()}  # fmt: skip

    @app.get("/health")
    async def health():
        loaded = list(server.batcher.predictor.kinds)  # least recently used first
        root, fingerprint = str(server.opened.library.root), server.opened.fingerprint
        return {"status": "ok", "library": root, "backbone": fingerprint, "loaded": loaded}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return server.metrics.text()

    return app


def run_server(options: ServeOptions) -> int:
    """Serve until SIGINT/SIGTERM (uvicorn finishes the requests in flight first)."""
    try:
        import uvicorn
    except ImportError:
        raise UserError("serve: needs FastAPI and uvicorn: pip install 'adafuse[serve]'") from None
    options.token = options.token or os.environ.get(TOKEN_VARIABLE) or None
    server = Server(options)
    app = build_app(server)
    _GracefulServer = _graceful_server_class()  # noqa: N806 - a class
    config = uvicorn.Config(
        app, host=options.host, port=options.port, log_level="warning", timeout_graceful_shutdown=30
    )
    print(f"adafuse serve: {server.opened.library.root} on http://{options.host}:{options.port}", flush=True)
    try:
        _GracefulServer(config).run()
    finally:
        server.batcher.stop()
    print("adafuse serve: stopped", flush=True)
    return 0


def _graceful_server_class():
    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn's server, ending with exit 0 after a graceful stop on SIGTERM or SIGINT (uvicorn itself raises the
        signal again once the requests in flight are done, so the process would die by it)."""

        @contextlib.contextmanager
        def capture_signals(self):
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return GracefulServer

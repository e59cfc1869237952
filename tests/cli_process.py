"""The ``adafuse`` command line in a process of its own, forked from a warm server.

A test that kills a run (``kill -9``, a fault point), reads its exit code or checks that nothing but one
line reached stderr needs a real process. Starting ``python -m adafuse.continual.cli`` costs several seconds
of imports (torch, transformers, Lightning) before the first line of adafuse runs; here a forkserver imports
them once and every call forks a fresh child from it. The child is a separate process like any other: its
own pid, memory, environment, working folder, stdout/stderr (files, read back afterwards) and exit status
(``-9`` when it was killed). Only the imports are shared, and nothing has run in the server before the fork.
Where the process must be started exactly as a user starts it (``python -m``, Lightning's DDP re-launch),
the tests still use ``subprocess``.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRELOAD = ["adafuse.continual.cli", "adafuse.continual.jobs.run", "adafuse.continual.jobs.fuse", "lightning"]
_context = None


def _forkserver():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _child(args: list[str], env: dict[str, str], cwd: str, out_path: str, err_path: str) -> None:
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for fd, path in ((1, out_path), (2, err_path)):
        target = os.open(path, os.O_WRONLY | os.O_APPEND)
        os.dup2(target, fd)
        os.close(target)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 - the process's own stdout
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.argv = ["adafuse", *args]
    if os.environ.get("PYTEST_XDIST_WORKER"):  # a worker per core already: its child takes one thread, as it does
        import torch

        torch.set_num_threads(1)
    from adafuse.continual.cli import main

    code = main(args)
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        if stream is not None:
            stream.flush()
    os._exit(code if isinstance(code, int) else 0)


class CliProcess:
    """One running ``adafuse`` command: ``pid``, ``kill()``, ``wait()``, its output so far."""

    def __init__(self, args, env: dict[str, str] | None = None, cwd: Path | str = ROOT):
        folder = Path(tempfile.mkdtemp(prefix="adafuse-cli-"))
        weakref.finalize(self, shutil.rmtree, folder, ignore_errors=True)  # its output files go with the object
        self._out, self._err = folder / "stdout", folder / "stderr"
        self._out.touch()
        self._err.touch()
        environment = {
            k: v for k, v in os.environ.items() if k != "ADAFUSE_FAULT"
        }  # a fault is asked for, never inherited
        environment.update({"PYTHONUNBUFFERED": "1", **(env or {})})
        context = _forkserver()
        self.args = [str(a) for a in args]
        self._process = context.Process(
            target=_child, args=(self.args, environment, str(cwd), str(self._out), str(self._err)), daemon=False
        )
        self._process.start()
        self.pid = self._process.pid

    def stdout(self) -> str:
        return self._out.read_text(errors="replace")

    def stderr(self) -> str:
        return self._err.read_text(errors="replace")

    def wait_for_line(self, prefix: str, timeout: float = 300) -> None:
        """Block until a stdout line starts with ``prefix`` (or the process ends, or ``timeout``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(line.startswith(prefix) for line in self.stdout().splitlines()):
                return
            if not self._process.is_alive():
                raise AssertionError(f"ended before printing {prefix!r}: {self.stderr()[-2000:]}")
            time.sleep(0.05)
        raise AssertionError(f"no line {prefix!r} within {timeout} s")

    def kill(self) -> None:
        self._process.kill()

    def wait(self, timeout: float = 600) -> subprocess.CompletedProcess:
        self._process.join(timeout)
        if self._process.exitcode is None:
            self._process.kill()
            self._process.join()
            raise AssertionError(f"adafuse {' '.join(self.args)} ran past {timeout} s")
        return subprocess.CompletedProcess(self.args, self._process.exitcode, self.stdout(), self.stderr())


def run_cli(*args, env: dict[str, str] | None = None, cwd: Path | str = ROOT) -> subprocess.CompletedProcess:
    """Run ``adafuse ARGS`` in a process of its own; returns its exit status (``-9`` if killed) and output."""
    return CliProcess(args, env=env, cwd=cwd).wait()


# a job's ranks meet on loopback only: gloo otherwise connects them through the address the host name resolves to
LOOPBACK = {"MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo"}


def cli_ranks(world: int, *args, cwd: Path | str = ROOT) -> list[subprocess.CompletedProcess]:
    """``adafuse ARGS`` as ``world`` ranks of one job, each forked from the warm server with the environment
    ``torchrun`` gives its processes (Lightning then joins them instead of launching its own); each must exit 0."""
    job = {**LOOPBACK, "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world)}
    ranks = [
        CliProcess(args, cwd=cwd, env={**job, "NODE_RANK": "0", "RANK": str(r), "LOCAL_RANK": str(r)})
        for r in range(world)
    ]
    results = [rank.wait() for rank in ranks]
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    return results


def _rank(function, rank: int, args: tuple) -> None:
    import torch

    torch.set_num_threads(1)  # a thread per process: the ranks share the cores
    function(rank, *args)


def spawn_ranks(function, world: int, *args, timeout: float = 300) -> None:
    """``function(rank, *args)`` in ``world`` processes forked from the warm server (what ``torch.multiprocessing
    .spawn`` does, without each process importing torch afresh); every one must exit with status 0."""
    context = _forkserver()
    processes = [context.Process(target=_rank, args=(function, rank, args)) for rank in range(world)]
    for process in processes:
        process.start()
    deadline = time.monotonic() + timeout
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.exitcode is None:
            process.kill()
    codes = [process.exitcode for process in processes]
    assert codes == [0] * world, f"ranks exited with {codes}"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _group_rank(rank: int, backend: str, function, world: int, port: int, args: tuple) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    os.environ.update(LOOPBACK, MASTER_PORT=str(port))
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=120))  # fail, not hang
    function(rank, world, *args)
    dist.barrier()
    # Leave without destructors: tearing down DDP's reducer joins gloo's worker thread while holding the GIL,
    # and the worker may need the GIL to free a finished work's thread-local state (a deadlock seen on a
    # clean-clone run: rank 1 hung in ~ProcessGroupGloo after its work was done).
    os._exit(0)


def group_ranks(function, world: int, *args, backend: str = "gloo") -> None:
    """``function(rank, world, *args)`` in ``world`` processes joined in a process group on loopback (gloo on the
    CPU, ``backend="nccl"`` on CUDA devices)."""
    spawn_ranks(_group_rank, world, backend, function, world, free_port(), args)

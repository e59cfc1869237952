"""The malloc thresholds the CLI sets for CPU tensor work."""

import ctypes.util
import sys

import pytest

from adafuse.continual import cli
from adafuse.continual.runtime.allocator import tune_malloc

GLIBC = sys.platform.startswith("linux") and "libc.so.6" in (ctypes.util.find_library("c") or "")


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_thresholds_are_set_on_glibc(monkeypatch):
    monkeypatch.delenv("ADAFUSE_MALLOC", raising=False)
    assert tune_malloc() is True


def test_default_leaves_malloc_alone(monkeypatch):
    monkeypatch.setenv("ADAFUSE_MALLOC", "default")
    assert tune_malloc() is False


def test_the_cli_tunes_malloc_before_any_command(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(cli, "tune_malloc", lambda: calls.append(1) or True)
    assert cli.main(["no-such-command"]) == 2
    assert calls == [1]

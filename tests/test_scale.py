"""Scale-out: the smoke sequence under Lightning DDP (gloo, 2 processes), a 15-task sequence with flat
memory, and a fusion over 32 library adapters (tiny backbone)."""

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import yaml
from cli_process import cli_ranks

from adafuse.continual.cli import main
from adafuse.continual.config import load_config
from adafuse.fusion.backbone import BackboneConfig, load_model
from adafuse.fusion.fingerprint import fingerprint
from adafuse.fusion.kinds import AdapterConfig
from adafuse.fusion.library import AdapterLibrary
from adafuse.fusion.model import AdaptedModel

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "sequence" / "smoke.yaml")
TINY_BACKBONE = yaml.safe_load((ROOT / "configs" / "backbone" / "tiny-bert.yaml").read_text())


# two tasks, one short epoch; 5 test batches a task: 3 and 2 per rank
ONE_EPOCH = ["--tasks", "[bbc-business, bbc-tech]", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "4",
             "--trainer.eval_batch_size", "100"]  # fmt: skip


def two_processes(*args: str) -> subprocess.CompletedProcess:
    """``adafuse`` on 2 CPU processes (Lightning re-launches it), which must succeed."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK")}
    command = [sys.executable, "-m", "adafuse.continual.cli", *args, "--trainer.accelerator", "cpu"]
    result = subprocess.run([*command, "--trainer.devices", "2"], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_two_processes_under_ddp_then_a_fusion_on_a_sharded_backbone(tmp_path):
    """``ddp`` matches the single-process run; then a fusion trains over its library under ``fsdp`` (the sources'
    checks before and after run 5 test batches: 3 and 2 per process, so one process runs a spare pass), and the
    fusion's key bias, which gets no gradient, does not stop DDP."""
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert main(["run", SMOKE, *ONE_EPOCH, "--out", str(single)]) == 0
    two_processes("run", SMOKE, *ONE_EPOCH, "--out", str(ddp), "--trainer.strategy", "ddp")
    assert AdapterLibrary(ddp / "library").verify() == []
    one, two = (json.loads((d / "metrics.json").read_text()) for d in (single, ddp))
    assert two["tasks"] == one["tasks"] and two["bwt"] == 0.0 and two["forgetting"] == 0.0
    for row_one, row_two in zip(one["accuracy_matrix"], two["accuracy_matrix"], strict=True):
        for a, b in zip(row_one, row_two, strict=True):
            assert (a is None and b is None) or abs(a - b) <= 0.02
    assert len(AdapterLibrary(ddp / "library").entries()) == 4  # one writer: each artefact once

    fusion = tmp_path / "fusion"
    fuse = [str(ROOT / "configs" / "fusion" / "smoke.yaml"), "--trainer.max_epochs", "1", "--trainer.eval_batch_size"]
    fuse += ["100", "--library", str(ddp / "library"), "--out", str(fusion), "--trainer.strategy", "fsdp"]
    # ranks started as torchrun starts them (the run above had Lightning launch its second process)
    result = cli_ranks(2, "fuse", *fuse, "--trainer.accelerator", "cpu", "--trainer.devices", "2")[0]
    assert "of the backbone's weights (the input embeddings whole, the rest split 2 ways)" in result.stdout
    metrics = json.loads((fusion / "metrics.json").read_text())
    assert metrics["source_files_unchanged"] and AdapterLibrary(ddp / "library").verify() == []
    assert metrics["source_accuracy_after"] == metrics["source_accuracy_before"]
    assert metrics["source_accuracy_before"] == pytest.approx(metrics["source_accuracy_recorded"], abs=1e-6)


def _write_tasks(folder: Path, count: int) -> list[dict]:
    words = ["market", "profit", "goal", "match", "vote", "party", "phone", "chip", "film", "song"]
    tasks = []
    for t in range(count):
        a, b = words[t % 10], words[(t + 3) % 10]
        rows = [f"{a if i % 2 else b} {i} {t},{'yes' if i % 2 else 'no'}" for i in range(24)]
        (folder / f"t{t}.csv").write_text("text,label\n" + "\n".join(rows) + "\n")
        tasks.append({"name": f"t{t}", "source": f"t{t}.csv", "validation_ratio": 0.25, "test_ratio": 0.25,
                      "max_length": 8})  # fmt: skip
    return tasks


TASKS = 15  # the monitor evaluates every earlier task after each: the cost grows with the square


@pytest.mark.slow
def test_a_long_sequence_keeps_memory_flat(tmp_path, monkeypatch):
    live, peak = set(), [0]
    add, delete = AdaptedModel.add_adapter, AdaptedModel.delete_adapter

    def counting_add(self, name, config):
        add(self, name, config)
        live.add(name)
        peak[0] = max(peak[0], len(live))

    def counting_delete(self, name):
        delete(self, name)
        live.discard(name)

    monkeypatch.setattr(AdaptedModel, "add_adapter", counting_add)
    monkeypatch.setattr(AdaptedModel, "delete_adapter", counting_delete)
    config = {
        "sequence": None, "tasks": _write_tasks(tmp_path, TASKS), "max_length": 8, "backbone": TINY_BACKBONE,
        "adapter": {"reduction_factor": 4},
        "trainer": {"max_epochs": 1, "batch_size": 8, "eval_batch_size": 64, "limit_train_batches": 1,
                    "progress_bar": False},
    }  # fmt: skip
    (tmp_path / "long.yaml").write_text(yaml.safe_dump(config))
    started = time.perf_counter()
    assert main(["run", str(tmp_path / "long.yaml"), "--out", str(tmp_path / "out")]) == 0
    print(f"\n{TASKS}-task sequence: {time.perf_counter() - started:.1f} s")
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert len(metrics["tasks"]) == TASKS and metrics["bwt"] == 0.0
    assert all(v is not None for v in metrics["accuracy_matrix"][-1])
    assert peak[0] <= 2, peak  # the adapter in training and at most one loaded for evaluation
    assert len(AdapterLibrary(tmp_path / "out" / "library").entries()) == 2 * TASKS


@pytest.mark.slow
def test_fusion_over_32_library_adapters(tmp_path):
    backbone_config = load_config(BackboneConfig, ROOT / "configs" / "backbone" / "tiny-bert.yaml")
    backbone = load_model(backbone_config)
    record = {"fingerprint": fingerprint(backbone), "backbone": asdict(backbone_config)}
    model, library = AdaptedModel(backbone), AdapterLibrary(tmp_path / "library")
    adapter = AdapterConfig(reduction_factor=4)
    generator = torch.Generator().manual_seed(0)
    for k in range(32):
        model.add_adapter(f"s{k}", adapter)
        state = {
            n: v + 0.1 * torch.randn(v.shape, generator=generator) for n, v in model.adapter_state(f"s{k}").items()
        }
        library.add("adapter", f"s{k}", state, config={"adapter": asdict(adapter)}, **record)
        model.delete_adapter(f"s{k}")
    config = {
        "target": {"name": "bbc-topic5-fewshot", "shots": 8, "max_length": 32}, "sources": "all", "max_length": 32,
        "backbone": TINY_BACKBONE, "adapter": {"reduction_factor": 4},
        "trainer": {"max_epochs": 1, "batch_size": 8, "eval_batch_size": 128, "progress_bar": False},
    }  # fmt: skip
    (tmp_path / "wide.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "fusion"
    assert main(["fuse", str(tmp_path / "wide.yaml"), "--library", str(tmp_path / "library"), "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    print(f"\n32-source fusion: train {metrics['train_wall_time_s']:.1f} s for {metrics['epochs']} epoch(s)")
    assert len(metrics["sources"]) == 32 and all(len(row) == 32 for row in metrics["attention"])
    assert all(abs(sum(row) - 1.0) < 1e-4 for row in metrics["attention"])
    assert AdapterLibrary(tmp_path / "library").verify() == []


@pytest.mark.parametrize(
    "env,main_process",
    [
        ({}, True),
        ({"LOCAL_RANK": "1"}, False),  # a process Lightning re-launched for device 1
        ({"LOCAL_RANK": "0", "NODE_RANK": "1"}, False),
        ({"RANK": "3", "LOCAL_RANK": "1"}, False),  # torchrun
        ({"RANK": "0", "LOCAL_RANK": "0"}, True),
        ({"SLURM_NTASKS": "8", "SLURM_PROCID": "5"}, False),  # srun
        ({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, True),
    ],
)
def test_writer_rank_from_the_launchers_environment(monkeypatch, env, main_process):
    from adafuse.continual.runtime import distributed

    for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_NTASKS", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert distributed.is_main() is main_process

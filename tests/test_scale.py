"""Scale-out: the smoke sequence under Lightning DDP (gloo, 2 processes), a 30-task sequence with flat
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


ONE_EPOCH = ["--trainer.max_epochs", "1", "--trainer.eval_batch_size", "100"]  # 5 test batches: 3 and 2 per rank


def two_processes(*args: str) -> subprocess.CompletedProcess:
    """``adafuse`` on 2 CPU processes (Lightning re-launches it), which must succeed."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK")}
    command = [sys.executable, "-m", "adafuse.continual.cli", *args, "--trainer.accelerator", "cpu"]
    result = subprocess.run([*command, "--trainer.devices", "2"], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    two_processes("run", SMOKE, *ONE_EPOCH, "--out", str(out), "--trainer.strategy", "ddp")
    return out


@pytest.mark.slow
@pytest.mark.xdist_group("ddp")
def test_ddp_two_processes_match_the_single_process_run(tmp_path, ddp_run):
    single = tmp_path / "single"
    assert main(["run", SMOKE, *ONE_EPOCH, "--out", str(single)]) == 0
    assert AdapterLibrary(ddp_run / "library").verify() == []
    one, two = (json.loads((d / "metrics.json").read_text()) for d in (single, ddp_run))
    assert two["tasks"] == one["tasks"] and two["bwt"] == 0.0 and two["forgetting"] == 0.0
    for row_one, row_two in zip(one["accuracy_matrix"], two["accuracy_matrix"], strict=True):
        for a, b in zip(row_one, row_two, strict=True):
            assert (a is None and b is None) or abs(a - b) <= 0.02
    assert len(AdapterLibrary(ddp_run / "library").entries()) == 6  # one writer: each artefact once


@pytest.mark.slow
@pytest.mark.xdist_group("ddp")
def test_sharded_backbone_runs_and_fuses_as_ddp_does(tmp_path, ddp_run):
    """``trainer.strategy: fsdp`` end to end: the same adapters, bit for bit, and the same accuracy matrix as the
    ddp run (sharding moves weights, not arithmetic), then a fusion trained over the library it wrote."""
    out = tmp_path / "fsdp"
    result = two_processes("run", SMOKE, *ONE_EPOCH, "--out", str(out), "--trainer.strategy", "fsdp")
    assert "each process holds 50% of the backbone's weights" in result.stdout
    sharded, plain = AdapterLibrary(out / "library"), AdapterLibrary(ddp_run / "library")
    assert [e["sha256"] for e in sharded.entries()] == [e["sha256"] for e in plain.entries()]
    one, two = (json.loads((d / "metrics.json").read_text()) for d in (ddp_run, out))
    assert two["accuracy_matrix"] == one["accuracy_matrix"] and two["bwt"] == 0.0
    fusion = tmp_path / "fusion"
    fuse = str(ROOT / "configs" / "fusion" / "smoke.yaml")
    two_processes("fuse", fuse, "--library", str(out / "library"), "--out", str(fusion), "--trainer.strategy", "fsdp")
    metrics = json.loads((fusion / "metrics.json").read_text())
    assert metrics["source_files_unchanged"] and sharded.verify() == []
    assert metrics["source_accuracy_after"] == metrics["source_accuracy_before"]


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


@pytest.mark.slow
def test_thirty_task_sequence_keeps_memory_flat(tmp_path, monkeypatch):
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
        "sequence": None, "tasks": _write_tasks(tmp_path, 30), "max_length": 8, "backbone": TINY_BACKBONE,
        "adapter": {"reduction_factor": 4},
        "trainer": {"max_epochs": 1, "batch_size": 8, "eval_batch_size": 64, "limit_train_batches": 1,
                    "progress_bar": False},
    }  # fmt: skip
    (tmp_path / "thirty.yaml").write_text(yaml.safe_dump(config))
    started = time.perf_counter()
    assert main(["run", str(tmp_path / "thirty.yaml"), "--out", str(tmp_path / "out")]) == 0
    print(f"\n30-task sequence: {time.perf_counter() - started:.1f} s")
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert len(metrics["tasks"]) == 30 and metrics["bwt"] == 0.0
    assert all(v is not None for v in metrics["accuracy_matrix"][-1])
    assert peak[0] <= 2, peak  # the adapter in training and at most one loaded for evaluation
    assert len(AdapterLibrary(tmp_path / "out" / "library").entries()) == 60


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

"""``trainer.compile`` / ``predict --compile``: no graph breaks in the common modes, one compilation for every task
of a kind (guards on kinds and shapes, not names), compiled equals eager, and a compiled sequence measures what
an eager one does (BWT = 0.0 for isolated adapters)."""

import json
import signal
from pathlib import Path

import pytest
import torch
import torch._dynamo as dynamo
from cli_process import run_cli
from conftest import TINY, randomize, tiny_backbone, tiny_batch
from test_kinds import KIND_CONFIGS

from adafuse.continual.cli import main
from adafuse.fusion.attention import FusionConfig
from adafuse.fusion.compiling import AutoCompile, compiled, graphs_compiled
from adafuse.fusion.kinds import AdapterConfig
from adafuse.fusion.model import AdaptedModel

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "sequence" / "smoke.yaml")


@pytest.fixture
def graph_backend(monkeypatch):
    """Compile with dynamo's ``eager`` backend: the same graphs and guards as inductor, without code generation
    (the inductor test below checks the generated code)."""
    monkeypatch.setenv("ADAFUSE_COMPILE_BACKEND", "eager")
    compiled.cache_clear()
    dynamo.reset()
    yield
    compiled.cache_clear()
    dynamo.reset()


def explain_breaks(model: AdaptedModel, batch: dict) -> list[str]:
    explanation = dynamo.explain(model)(**batch)
    return [str(reason.reason).splitlines()[0] for reason in explanation.break_reasons]


@pytest.mark.parametrize("kind", sorted(KIND_CONFIGS))
def test_each_adapter_kind_traces_without_graph_breaks(kind):
    model = AdaptedModel(tiny_backbone("bert"))
    model.add_adapter("a", KIND_CONFIGS[kind])
    model.add_head("a", 2)
    model.activate(adapters=["a"], head="a")
    model.set_trainable(adapters=["a"], heads=["a"])
    assert explain_breaks(model.train(), tiny_batch()) == []


@pytest.mark.parametrize(
    ("arch", "k"), [("bert", 2), ("bert", 8), ("distilbert", 2), ("gpt2", 2), ("llama", 2), ("t5", 2)]
)
def test_fusion_traces_without_graph_breaks_on_each_architecture(arch, k):
    model = AdaptedModel(tiny_backbone(arch))
    sources = [f"s{i}" for i in range(k)]
    for name in sources:
        model.add_adapter(name, AdapterConfig(reduction_factor=4))
    model.add_fusion("f", sources, FusionConfig())
    model.add_head("f", 2)
    model.activate(fusion="f", head="f")
    model.set_trainable(fusions=["f"], heads=["f"])
    assert explain_breaks(model.train(), tiny_batch()) == []  # a training step (evaluation: one graph, below)


def test_evaluating_five_tasks_of_one_kind_compiles_once(graph_backend):
    model = AdaptedModel(tiny_backbone("bert")).eval()
    for t in range(5):
        model.add_adapter(f"t{t}", AdapterConfig(reduction_factor=4))
        model.add_head(f"t{t}", 2)
    model.add_fusion("f", ["t0", "t1"], FusionConfig())
    model.add_fusion("g", ["t2", "t3"], FusionConfig())
    model.add_head("f", 2)
    randomize(model, std=0.2)
    model.compile_mode = "default"
    batch = tiny_batch()
    before = graphs_compiled()
    with torch.no_grad():
        for t in range(5):  # the monitor's row: every earlier task, its adapter and head
            model.activate(adapters=[f"t{t}"], head=f"t{t}")
            out = model(**batch)
            model.compile_mode = "off"
            assert torch.allclose(out, model(**batch), atol=1e-6)
            model.compile_mode = "default"
        assert graphs_compiled() - before == 1
        for fusion in ("f", "g"):
            model.activate(fusion=fusion, head="f")
            model(**batch)
    assert graphs_compiled() - before == 2  # one more for the fusion kind, none for the second fusion


def test_compiled_training_step_equals_eager_outputs_and_gradients():
    """Inductor's code for a fusion step (the fast path's forward, the backward the compiler derives) against
    eager (the hand-written backward). A single adapter's compiled run: the sequence test below."""
    from adafuse.continual.training.module import step_outputs
    from adafuse.fusion.backbone import BackboneConfig, load_model
    from adafuse.tasks.types import task_type

    one_block = {"model_type": "bert", **TINY["bert"], "num_hidden_layers": 1}  # inductor's time grows with blocks
    model = AdaptedModel(load_model(BackboneConfig(random_init=one_block)))
    for name in ("s0", "s1"):
        model.add_adapter(name, AdapterConfig(reduction_factor=4))
    model.add_fusion("f", ["s0", "s1"], FusionConfig())
    model.add_head("t", 3, dropout=0.0)  # no dropout: inductor draws its random numbers its own way
    randomize(model, std=0.2)
    model.activate(fusion="f", head="t")
    model.set_trainable(fusions=["f"], heads=["t"])
    model.train()
    batch, labels = tiny_batch(), torch.tensor([0, 2, 1])
    trained = [p for p in model.parameters() if p.requires_grad]
    results = []
    for function in (step_outputs, compiled(step_outputs, "default")):  # inductor
        model.zero_grad()
        _, logits, loss = function(model, task_type("classification"), batch, labels)
        loss.backward()
        results.append((logits.detach(), [p.grad for p in trained]))  # None: the key bias cancels in the softmax
    (eager, eager_grads), (fast, fast_grads) = results
    assert torch.allclose(fast, eager, atol=1e-5)
    for a, b in zip(fast_grads, eager_grads, strict=True):
        assert (a is None and b is None) or torch.allclose(a, b, atol=1e-5)


@pytest.mark.slow
def test_a_compiled_sequence_killed_and_resumed_measures_what_an_eager_one_does(graph_backend, tmp_path):
    args = ["run", SMOKE, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2"]
    args += ["--trainer.pad_to_multiple_of", "16", "--tasks", "[bbc-business, bbc-tech]"]
    assert main([*args, "--out", str(tmp_path / "eager")]) == 0
    compiled_run = [*args, "--out", str(tmp_path / "compiled"), "--trainer.compile", "default"]
    env = {"ADAFUSE_COMPILE_BACKEND": "eager"}
    killed = run_cli(*compiled_run, env={**env, "ADAFUSE_FAULT": "train-step:3"})  # task 2 of 2, mid-epoch
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = run_cli(*compiled_run, env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    eager, fast = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("eager", "compiled"))
    assert fast["bwt"] == 0.0 and fast["forgetting"] == 0.0
    for row_eager, row_fast in zip(eager["accuracy_matrix"], fast["accuracy_matrix"], strict=True):
        assert row_fast == pytest.approx(row_eager, abs=1e-6)


def test_predict_compiled_writes_what_eager_predict_writes(graph_backend, tmp_path):
    assert main(["run", SMOKE, "--trainer.max_epochs", "1", "--out", str(tmp_path / "run")]) == 0
    rows = tmp_path / "rows.jsonl"
    texts = ["shares fell on the market", "the striker scored twice", "a new phone chip", "profits rose"]
    rows.write_text("".join(json.dumps({"text": t, "task": "bbc-business" if i % 2 else "bbc-tech"}) + "\n"
                            for i, t in enumerate(texts)))  # fmt: skip
    outputs = []
    for mode in ("off", "default"):
        out = tmp_path / f"{mode}.jsonl"
        flags = ["--task-column", "task", "--input", str(rows), "--out", str(out), "--compile", mode]
        assert main(["predict", "--library", str(tmp_path / "run" / "library"), *flags]) == 0
        outputs.append([json.loads(line) for line in out.read_text().splitlines()])
    for eager, fast in zip(*outputs, strict=True):
        assert fast["label"] == eager["label"] and fast["probabilities"] == pytest.approx(eager["probabilities"])


def test_bad_compile_mode_is_one_line_exit_2(tmp_path, capsys):
    assert main(["run", SMOKE, "--out", str(tmp_path / "o"), "--trainer.compile", "fast"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "trainer.compile" in err and "'fast'" in err and "reduce-overhead" in err
    assert not (tmp_path / "o").exists()


def test_auto_keeps_compiling_only_where_the_steps_left_repay_it():
    said = []

    def probe(planned, eager_s, compile_s, compiled_s):
        auto = AutoCompile(planned, probe=3, log=said.append)
        while auto.decision is None:
            if auto.use_compiled():
                auto.record(compiled_s + (compile_s if auto.first_compiled is None else 0.0))
            else:
                auto.record(eager_s)
        return auto.decision

    assert probe(1000, eager_s=0.10, compile_s=20.0, compiled_s=0.05) == "compiled"  # 400 steps repay it
    assert "break-even after 400 steps" in said[-1]
    assert probe(100, eager_s=0.10, compile_s=20.0, compiled_s=0.05) == "eager"  # 93 steps left do not
    assert probe(10**6, eager_s=0.10, compile_s=1.0, compiled_s=0.12) == "eager"  # slower compiled
    assert "no faster than eager" in said[-1]


@pytest.mark.cuda
def test_cuda_graphs_mode_equals_eager_on_cuda():
    model = AdaptedModel(tiny_backbone("bert"))
    for name in ("s0", "s1"):
        model.add_adapter(name, AdapterConfig(reduction_factor=4))
    model.add_fusion("f", ["s0", "s1"], FusionConfig())
    model.add_head("f", 3)
    randomize(model, std=0.2)
    model = model.cuda().eval()
    batch = {k: v.cuda() for k, v in tiny_batch().items()}
    with torch.no_grad():
        model.activate(fusion="f", head="f")
        eager = model(**batch)
        model.compile_mode = "reduce-overhead"
        for _ in range(3):  # recorded, then replayed
            fast = model(**batch).clone()
    assert torch.allclose(fast, eager, atol=1e-5)

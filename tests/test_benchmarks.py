"""The benchmark scripts run and report in the documented format (their timings are never asserted)."""

import json
from pathlib import Path

import pytest
from conftest import ROOT, TINY, load_script, tiny_backbone


def _module(name: str):
    return load_script(ROOT / "benchmarks" / f"{name}.py")


SPEED_FIELDS = {
    "impl", "layout", "backbone", "method", "K", "B", "L", "step_ms_median", "samples_per_s", "peak_rss_mb",
    "trainable_params", "total_params", "device", "threads", "step_ms_all", "loss_first", "loss_last", "malloc",
}  # fmt: skip


@pytest.fixture
def tiny_folder(tmp_path):
    """A tiny random BERT saved as a model folder (speed.py's --backbone)."""
    folder = tmp_path / "tiny"
    tiny_backbone("bert").save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_speed_script_on_a_tiny_backbone(tmp_path, tiny_folder):
    folder = tiny_folder
    out = tmp_path / "speed.jsonl"
    methods = "single_train,fusion_train"  # each method's memory run is a process of its own
    args = ["--backbone", str(folder), "--methods", methods, "--fusion-k", "2", "-B", "2", "-L", "8"]
    args += ["--warmup", "1", "--steps", "3", "--rss-steps", "1", "--memory-jobs", "2", "--threads", "1", "--phases"]
    assert _module("speed").main([*args, "--out", str(out)]) == 0  # its memory runs: processes of their own
    records = [json.loads(line) for line in out.read_text().splitlines()]
    configs = [("single_train", 1), ("fusion_train", 2)]
    timed = [r for r in records if r["layout"] == "interleaved"]
    memory = [r for r in records if r["layout"] == "process"]
    assert [(r["method"], r["K"]) for r in timed] == configs == [(r["method"], r["K"]) for r in memory]
    for record in records:
        assert SPEED_FIELDS <= set(record) and record["impl"] == "adafuse" and record["step_ms_median"] > 0
        assert record["B"] == 2 and record["L"] == 8 and record["total_params"] > 0
    assert all(len(r["step_ms_all"]) == 3 and r["peak_rss_mb"] is None for r in timed)
    assert all(len(r["step_ms_all"]) == 1 and r["peak_rss_mb"] > 0 for r in memory)
    assert timed[1]["trainable_params"] > timed[0]["trainable_params"] > 0
    assert all(r["loss_first"] is not None for r in timed)  # training methods report their loss
    for record in timed:  # --phases: the parts of a training step, each within the whole step's time
        parts = [record["forward_ms"], record["backward_ms"], record["optimizer_ms"]]
        assert all(part > 0 for part in parts) and sum(parts) <= 1.5 * max(record["step_ms_all"])
    table = Path(str(out) + ".md").read_text()
    assert "fusion_train K=2 / single_train" in table
    assert "peak RSS fusion_train K=2 / single_train" in table and "3 interleaved rounds" in table
    assert TINY["bert"]["hidden_size"] == 16


def test_speed_ratios_are_paired_by_round():
    speed = _module("speed")
    base = {"backbone": "b", "B": 1, "L": 1, "device": "cpu", "threads": 1, "precision": "32", "placement": "p"}
    single = {**base, "layout": "interleaved", "method": "single_train", "K": 1, "step_ms_all": [100, 200, 100]}
    fusion = {**base, "layout": "interleaved", "method": "fusion_train", "K": 2, "step_ms_all": [110, 220, 300]}
    single["step_ms_median"], fusion["step_ms_median"] = 100, 220
    # round ratios 1.1, 1.1, 3.0 -> 1.1 (the ratio of the medians would say 2.2)
    assert speed.paired_ratio(fusion, single) == pytest.approx(1.1)
    memory = [{**single, "layout": "process", "peak_rss_mb": 500}, {**fusion, "layout": "process", "peak_rss_mb": 550}]
    table = speed.ratio_table([single, fusion, *memory])
    assert "| fusion_train K=2 / single_train | 1.100 |" in table
    assert "| peak RSS fusion_train K=2 / single_train | 1.100 |" in table


def _sequence(method, seed, acc, bwt):
    return {
        "kind": "sequence", "method": method, "seed": seed, "tasks": {"a": acc, "b": acc - 0.1}, "acc": acc,
        "bwt": bwt, "forgetting": -bwt, "fwt": 0.0, "wall_time_s": 100.0 + seed, "trainable_params": 1234,
    }  # fmt: skip


def _fusion(method, seed, acc):
    return {
        "kind": "fusion", "method": method, "seed": seed, "target": "t", "test_accuracy": acc,
        "test_macro_f1": acc - 0.05, "sources_unchanged": True, "wall_time_s": 10.0, "trainable_params": 99,
    }  # fmt: skip


def test_accuracy_table_from_records():
    render = _module("accuracy").render_table
    records = [
        _sequence("adapters", 0, 0.9, 0.0),
        _sequence("adapters", 1, 0.8, 0.0),
        _sequence("shared-adapter", 0, 0.7, -0.2),
        _fusion("fusion", 0, 0.90),
        _fusion("single-adapter", 0, 0.85),
        _fusion("fusion", 1, 0.80),
        _fusion("single-adapter", 1, 0.81),
    ]
    table = render(records)
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert "| adapters | 2 | 0.8500 ± 0.0707 | 0.7500 ± 0.0707 | 0.8500 ± 0.0707 | 0.0000 ± 0.0000 |" in table
    assert "| shared-adapter | 1 | 0.7000 | 0.6000 | 0.7000 | -0.2000 | 0.2000 |" in table
    assert rows["adapters"].endswith("| 100 ± 1 | 1,234 |")
    assert "| t | fusion | 2 | 0.8500 ± 0.0707 |" in table
    assert "fusion − single-adapter (paired by seed): 0.0200 ± 0.0424 test accuracy" in table


def test_inference_table_from_records():
    markdown = _module("inference").markdown

    class Args:
        batch_size, max_length, device, threads = 32, 128, "cpu", 2

    records = [
        {"bench": "mixed", "mode": "routed", "rows": 10, "seconds": 2.0, "max_prob_diff": 0.0},
        {"bench": "mixed", "mode": "per-task", "rows": 10, "seconds": 3.0, "max_prob_diff": 1e-7},
        {"bench": "adapterdrop", "kind": "adapter", "artefact": "a", "task": "a", "drop_layers": 0,
         "test_accuracy": 0.9, "seconds": 4.0},
        {"bench": "adapterdrop", "kind": "adapter", "artefact": "a", "task": "a", "drop_layers": 2,
         "test_accuracy": 0.8, "seconds": 2.0},
    ]  # fmt: skip
    table = markdown(records, Args)
    assert "| per-task | 10 | 3.00 | 1.50 x | 1.0e-07 |" in table
    assert "| adapter a | a | 2 | 0.8000 | 2.00 | 2.00 x |" in table


@pytest.mark.slow
def test_speed_script_times_each_strategy_step_against_its_naive_counterpart(tiny_folder, capsys):
    speed = _module("speed")
    methods = "single_train,ewc_train,lwf_train,replay_train"
    args = ["--backbone", str(tiny_folder), "--methods", methods, "-B", "2", "-L", "8", "--warmup", "1", "--steps", "2"]
    # the interleaved child's work, in this process (whose imports are already here); the parent's part is the
    # table, and the test above runs the whole script
    assert speed.main([*args, "--threads", "1", "--rss-steps", "0", "--child-interleaved"]) == 0
    records = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["method"] for r in records] == methods.split(",")
    assert all(r["loss_first"] is not None and r["step_ms_median"] > 0 for r in records)
    table = speed.ratio_table(records)
    assert all(f"{name}_train / single_train" in table for name in ("ewc", "lwf", "replay"))


def test_method_label_names_the_kind_and_the_router():
    label = _module("accuracy").method_label
    assert label({"method": "adapters", "adapter_kind": "lora", "router": None}) == "adapters (lora)"
    assert label({"method": "adapters", "adapter_kind": "bottleneck", "router": "trained"}) == (
        "adapters (bottleneck, trained router)"
    )
    trained = {"method": "adapters", "router": "trained", "router_training": {"epochs": 3, "lr": 0.003}}
    assert label(trained) == "adapters (trained router: 3 epochs at lr 0.003)"
    assert label({"method": "ewc"}) == "ewc"


def test_library_scale_distractors_and_table():
    from adafuse.tasks.bbc import Article

    scale = _module("library_scale")
    words = ["Shares", "rose", "5%", "in", '"London"', "£3bn", "Tech", "firms"]
    articles = [
        Article(f"x/{i}.txt", "business" if i % 2 else "tech", "train", " ".join(words[: 2 + i % 7])) for i in range(40)
    ]
    tasks = scale.distractor_labels(articles)
    assert len(tasks) == 20 and all(len(labels) == 40 for labels in tasks.values())
    shuffled = [name for name in tasks if "shuffled" in name]
    assert len(shuffled) == 8 and all(sorted(tasks[n]) == sorted(a.category for a in articles) for n in shuffled)
    assert len(set(tasks["distractor-length-4"])) == 4
    record = {"kind": "fusion", "variant": "auto-5 (leep)", "true_sources_chosen": 5, "ranking_s": 10.0}
    rows = [{**record, "test_accuracy": a, "validation_accuracy": a, "train_wall_time_s": 30.0} for a in (0.9, 0.8)]
    assert "| auto-5 (leep) | 0.8500 ± 0.0707 | 0.8500 ± 0.0707 | 5.0 / 5 | 10.0 | 30.0 |" in scale.table(rows)


def test_fusion_recipe_table():
    recipe = _module("fusion_recipe")
    rows = [
        {"library": "1ep", "recipe": "default", "method": "fusion", "validation_accuracy": v, "test_accuracy": t,
         "train_wall_time_s": 30.0}
        for v, t in ((0.9, 0.92), (0.94, 0.96))
    ]  # fmt: skip
    assert "| 1ep | default | fusion | 2 | 0.9200 ± 0.0283 | 0.9400 ± 0.0283 | 30 |" in recipe.table(rows)
    assert set(recipe.RECIPES) >= {"default", "150-steps-lr1e-3"}


def test_fusion_peer_table_pairs_the_seeds():
    peer = _module("fusion_peer")
    rows = [
        {"side": side, "recipe": recipe, "method": "fusion", "seed": seed, "validation_accuracy": 0.9,
         "test_accuracy": test, "train_wall_time_s": 10.0}
        for side, recipe, seed, test in (("adapterhub", "adapterhub", 0, 0.95), ("adapterhub", "adapterhub", 1, 0.96),
                                         ("adafuse", "default", 0, 0.94), ("adafuse", "default", 1, 0.97))
    ]  # fmt: skip
    text = peer.table(rows)
    assert "| adapterhub | adapterhub | fusion | 2 | 0.9000 ± 0.0000 | 0.9550 ± 0.0071 | 10 |" in text
    assert "| | default | fusion | 2 | 0.0000 ± 0.0141 |" in text  # -0.01 and +0.01, seed by seed


def test_joint_reference_is_the_union_of_the_class_incremental_tasks():
    from adafuse.continual.config import RunConfig, load_config
    from adafuse.tasks.builtin import SEQUENCES, load_builtin

    joint = _module("accuracy").JOINT
    config = load_config(RunConfig, ROOT / "configs/sequence/bbc-class-incremental.yaml", joint)
    assert config.tasks == ["bbc-topic5"] and config.setting == "task-incremental" and config.method == "adapters"
    union = [load_builtin(name) for name in SEQUENCES["bbc-class-incremental"]]
    reference = load_builtin("bbc-topic5")

    def named(task, split: str) -> set[tuple[str, str]]:
        rows = task.splits[split]
        return {(i, task.label_names[y]) for i, y in zip(rows.ids, rows.labels, strict=True)}

    for split in ("train", "validation", "test"):
        assert set().union(*(named(t, split) for t in union)) == named(reference, split)


def test_memory_script_measures_a_training_step_on_the_tiny_config(tmp_path):
    """benchmarks/memory.py's per-variant work, in this process: the tiny config saved in float32, loaded in
    bfloat16 with a fusion over four adapters, one warm-up and one timed step; saved in bfloat16, with LoRA."""
    memory = _module("memory")
    folder = memory.saved(tmp_path, "tiny")
    assert (folder / "config.json").is_file() and memory.saved(tmp_path, "tiny") == folder  # saved once
    record = memory.child(folder, "bfloat16", "fusion", batch=2, length=8, steps=1, device="cpu")
    assert record["device"] == "cpu" and record["step_s"] > 0
    assert 0 < record["loaded_rss_mb"] <= record["load_peak_rss_mb"]
    assert 0 < record["step_start_rss_mb"] <= record["peak_rss_mb"]
    narrow = memory.saved(tmp_path, "tiny", "bfloat16")  # how the 8B size is saved (16 GB rather than 32)
    assert narrow.name == "tiny-bfloat16" and "bfloat16" in (narrow / "config.json").read_text()
    lora = memory.child(narrow, "bfloat16", "lora", batch=2, length=8, steps=0, device="cpu")
    assert lora["step_s"] > 0 and lora["peak_rss_mb"] > 0 and not lora["out_of_memory"]
    qk = memory.child(folder, "bfloat16", "fusion-qk", batch=2, length=8, steps=0, device="cpu")
    hidden, layers = memory.SIZES["tiny"]["hidden_size"], memory.SIZES["tiny"]["num_hidden_layers"]
    assert record["trained_parameters"] - qk["trained_parameters"] == layers * hidden * hidden  # W_V alone


@pytest.mark.parametrize(("dtype", "quantization", "tolerance"), [("float32", "none", 1e-5), ("bfloat16", "nf4", 0.05)])
def test_peft_lora_script_times_both_sides_from_the_same_weights(tmp_path, dtype, quantization, tolerance):
    """benchmarks/peft_lora.py on the tiny config: PEFT loads adafuse's exported LoRA and computes the same hidden
    states (within bfloat16's rounding there, on the same nf4 projections; the delta itself changes them by more),
    both sides train the same number of parameters, each side's step is timed and the ratio is theirs over ours."""
    pytest.importorskip("peft")
    script = _module("peft_lora")
    out = tmp_path / "peft.jsonl"
    args = ["--sizes", "tiny", "-B", "2", "-L", "8", "--warmup", "0", "--rounds", "2", "--targets", "q,v,ffn_out"]
    args += ["--dtype", dtype, "--quantization", quantization, "--work", str(tmp_path / "work")]
    assert script.main([*args, "--out", str(out)]) == 0
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["max_hidden_difference"] < tolerance < 0.1 < record["max_lora_delta"]
    assert record["adafuse_trained_parameters"] == record["peft_trained_parameters"] > 0
    assert record["adafuse_step_ms"] > 0 and record["peft_step_ms"] > 0
    assert record["throughput_over_peft"] == round(record["peft_step_ms"] / record["adafuse_step_ms"], 3)
    with pytest.raises(SystemExit) as refused:
        script.parse_args(["--targets", "q,query"])
    assert refused.value.code == 2

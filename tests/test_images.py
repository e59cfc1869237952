"""Image tasks on a tiny random ViT: an image folder and a JSONL of paths through run, fuse, predict and
report; images that do not decode and text tasks on an image backbone are refused in one line."""

import json
import random

import pytest
from conftest import ROOT
from PIL import Image

from adafuse.continual.cli import main

COLOURS = {"warm": (200, 60, 40), "cool": (40, 80, 200)}


def noisy_square(colour: tuple[int, int, int], rng: random.Random) -> Image.Image:
    """A 20 x 20 image of one colour with per-pixel noise (resized to 16 x 16 by the processor)."""
    image = Image.new("RGB", (20, 20))
    image.putdata([tuple(max(0, min(255, c + rng.randint(-40, 40))) for c in colour) for _ in range(400)])
    return image


def image_folder(folder, per_class: int = 12):
    """``datasets``' imagefolder layout: <split>/<class>/<n>.png."""
    rng = random.Random(0)
    for split, count in (("train", per_class), ("validation", 4), ("test", 4)):
        for name, colour in COLOURS.items():
            (folder / split / name).mkdir(parents=True, exist_ok=True)
            for n in range(count):
                noisy_square(colour, rng).save(folder / split / name / f"{n}.png")
    return folder


def image_jsonl(folder, per_class: int = 8):
    """JSONL splits whose ``path`` column names PNGs relative to the data folder; labels light / dark."""
    rng = random.Random(1)
    (folder / "png").mkdir(parents=True, exist_ok=True)
    for split, count in (("train", per_class), ("validation", 3), ("test", 3)):
        rows = []
        for label, colour in (("light", (230, 230, 230)), ("dark", (20, 20, 20))):
            for n in range(count):
                path = f"png/{split}-{label}-{n}.png"
                noisy_square(colour, rng).save(folder / path)
                rows.append({"path": path, "shade": label})
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def vit_yaml() -> str:
    backbone = (ROOT / "configs" / "backbone" / "tiny-vit.yaml").read_text()
    return (
        "seed: 0\nbackbone:\n"
        + "".join(f"  {line}\n" for line in backbone.splitlines() if not line.startswith("#"))
        + "adapter: {placement: pfeiffer, reduction_factor: 4}\n"
        "trainer: {max_epochs: 2, batch_size: 8, eval_batch_size: 32, lr: 0.003, progress_bar: false}\n"
    )


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("images")
    image_folder(tmp_path / "colours")
    image_jsonl(tmp_path / "shades")
    config = tmp_path / "images.yaml"
    config.write_text(
        "tasks:\n  - {name: colours, type: image, source: colours}\n"
        "  - {name: shades, type: image, source: shades, image_column: path, label_column: shade}\n"
        "method: adapters\n" + vit_yaml()
    )
    out = tmp_path / "out"
    assert main(["run", str(config), "--out", str(out)]) == 0
    return tmp_path, out, json.loads((out / "metrics.json").read_text())


def test_an_image_sequence_measures_accuracy_and_isolation(image_run):
    _, out, metrics = image_run
    assert metrics["tasks"] == ["colours", "shades"] and metrics["bwt"] == 0.0
    assert [metrics["per_task"][t]["metric"] for t in metrics["tasks"]] == ["accuracy", "accuracy"]
    assert metrics["accuracy_matrix"][1][0] == metrics["accuracy_matrix"][0][0]
    from adafuse.fusion.library import AdapterLibrary

    head = AdapterLibrary(out / "library").get("head", "colours")["config"]
    assert head["task_type"] == "image" and head["label_names"] == ["cool", "warm"]


def test_fusion_and_predict_on_images(image_run):
    tmp_path, out, _ = image_run
    fuse = tmp_path / "fuse.yaml"
    fuse.write_text("target: {name: colours-fused, type: image, source: colours}\nsources: all\n" + vit_yaml())
    assert main(["fuse", str(fuse), "--library", str(out / "library"), "--out", str(tmp_path / "fused")]) == 0
    fused = json.loads((tmp_path / "fused" / "metrics.json").read_text())
    assert fused["metric"] == "accuracy" and fused["source_files_unchanged"]
    rows = [
        {"image": str(tmp_path / "colours" / "test" / "warm" / "0.png"), "task": "colours"},
        {"image": str(tmp_path / "shades" / "png" / "test-dark-0.png"), "task": "shades"},
        {"image": str(tmp_path / "colours" / "test" / "cool" / "1.png"), "task": "colours-fused-fusion"},
    ]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["predict", "--library", str(out / "library"), "--input", str(tmp_path / "in.jsonl")]
    assert main([*args, "--text-column", "image", "--task-column", "task", "--out", str(tmp_path / "p.jsonl")]) == 0
    results = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["task"] for r in results] == ["colours", "shades", "colours-fused-fusion"]
    assert results[0]["label_name"] in COLOURS and results[1]["label_name"] in ("light", "dark")


def test_an_image_that_does_not_decode_is_refused(tmp_path, capsys):
    folder = image_jsonl(tmp_path / "shades", per_class=3)
    (folder / "png" / "broken.png").write_bytes(b"not an image")
    with open(folder / "test.jsonl", "a") as handle:
        handle.write(json.dumps({"path": "png/broken.png", "shade": "dark"}) + "\n")
    config = tmp_path / "c.yaml"
    config.write_text(
        f"tasks: [{{name: s, type: image, source: {folder}, image_column: path, label_column: shade}}]\n" + vit_yaml()
    )
    assert main(["run", str(config), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "test split, row 6, column 'path': the image does not decode" in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_a_text_task_on_an_image_backbone_is_refused(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("tasks: [bbc-business]\n" + vit_yaml())
    assert main(["run", str(config), "--out", str(tmp_path / "out")]) == 2
    assert "needs a text backbone; this one reads pixels" in capsys.readouterr().err


def test_the_digits_built_in_trains_on_a_vit(tmp_path):
    config = tmp_path / "digits.yaml"
    config.write_text("tasks: [digits]\n" + vit_yaml())
    out = tmp_path / "out"
    assert main(["run", str(config), "--trainer.limit_train_batches", "4", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["per_task"]["digits"]["metric"] == "accuracy" and metrics["accuracy_matrix"][0][0] > 0.0

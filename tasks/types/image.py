"""Image classification (ViT): an image and one label; accuracy, macro-F1 beside it.

Images come as an image folder (``train/``, ``validation/``, ``test/``, one sub-folder per class, read by
``datasets``' ``imagefolder``) or as a column of a CSV/JSONL/parquet file holding a path (relative to the data
file's folder) or the image bytes. Every image is decoded when the task is loaded, so an image that does not
decode is refused before anything is written. The backbone's image processor resizes and normalises them.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

from adafuse.fusion.errors import UserError
from adafuse.tasks.spec import SplitData, TaskSpec
from adafuse.tasks.types.classification import Classification


class ImageClassification(Classification):
    name = "image"
    head_type = "image_classification"

    inputs = "pixels"

    def check_backbone(self, sites, task: str) -> None:
        if sites.inputs != "pixels":
            raise UserError(f"task '{task}': an image task needs an image backbone (vit); this one reads text")

    def columns(self, spec: TaskSpec) -> list[str]:
        return [spec.image_column, spec.label_column]

    def example(self, image, label: int, label_names: list[str]) -> dict:
        raise UserError("tasks export: image tasks are not exported as files (train on them by name)")

    def split_data(self, rows: list[dict], spec: TaskSpec, index, split: str) -> SplitData:
        root = Path(spec.source) if Path(spec.source).is_dir() else Path(spec.source).parent
        images = []
        for number, row in enumerate(rows):
            where = f"task '{spec.name}', {split} split, row {number}, column '{spec.image_column}'"
            images.append(open_image(row[spec.image_column], root, where))
        labels = [index(r[spec.label_column], f"{split} split, row {n}") for n, r in enumerate(rows)]
        return SplitData(texts=images, labels=labels)

    def encode(self, split: SplitData, processor, max_length: int, cache_dir=None) -> list[dict]:
        pixels = processor(images=list(split.texts), return_tensors="pt")["pixel_values"]  # (N, 3, H, W)
        return [{"pixel_values": p, "labels": label} for p, label in zip(pixels, split.labels, strict=True)]

    def collator(self, processor, pad_to_multiple_of: int | None = None):
        return stack_examples  # every image is resized to the backbone's size: one shape already

    def predict(self, model, processor, texts: list, tasks: list[str], max_length: int, skip_layers: int, names):
        """``texts`` hold image paths (or bytes); every row's image goes through its task's adapter and head."""
        images = [open_image(t, Path("."), f"predict row {n + 1}") for n, t in enumerate(texts)]
        return super().predict(model, processor, images, tasks, max_length, skip_layers, names)

    def predict_inputs(self, images: list, processor, max_length: int) -> tuple[dict, list]:
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixels}, [None] * len(images)


def stack_examples(examples: list[dict]) -> dict[str, torch.Tensor]:
    """A batch: (B, 3, H, W) pixel values and (B,) labels."""
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "labels": torch.tensor([e["labels"] for e in examples]),
    }


def open_image(value, root: Path, where: str):
    """A decoded RGB image from a path (relative to ``root``), bytes, or a ``datasets`` image dict."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(value, dict):  # datasets' Image feature undecoded: {"bytes": ..., "path": ...}
        value = value.get("bytes") or value.get("path")
    try:
        if isinstance(value, bytes):
            image = Image.open(io.BytesIO(value))
        elif isinstance(value, str) and value:
            image = Image.open(Path(value) if Path(value).is_absolute() else root / value)
        else:
            raise UserError(f"{where}: expected an image path or bytes, found {type(value).__name__}")
        return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as err:
        raise UserError(f"{where}: the image does not decode ({type(err).__name__}: {err})") from None

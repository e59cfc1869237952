"""The built-in image task ``digits``: the 1,797 8 x 8 grey-scale handwritten digits (UCI optdigits' test set)
that the scikit-learn package ships (``sklearn/datasets/data/digits.csv.gz``).

The file is read without importing scikit-learn, as the BBC corpus is read without importing its package;
``pip install 'adafuse[images]'`` installs it. Split by the BBC rule on the row index: ``i % 10`` in {0, 5}
test, 1 validation, else train (1,257 / 180 / 360). Ink 0..16 becomes dark grey on white, RGB; the
backbone's image processor resizes the 8 x 8 images.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
from pathlib import Path

from adafuse.fusion.errors import UserError
from adafuse.tasks.spec import SplitData, TaskData


def digits(max_length: int = 128) -> TaskData:
    from PIL import Image

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("task 'digits' reads the digits scikit-learn ships; install it: pip install 'adafuse[images]'")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    with gzip.open(path, "rt") as handle:
        rows = [[int(float(v)) for v in row] for row in csv.reader(handle)]
    splits = {split: SplitData(texts=[], labels=[]) for split in ("train", "validation", "test")}
    for index, row in enumerate(rows):
        split = "test" if index % 10 in (0, 5) else "validation" if index % 10 == 1 else "train"
        pixels = bytes(255 - value * 255 // 16 for value in row[:64])  # 0..16 ink -> dark on white
        splits[split].texts.append(Image.frombytes("L", (8, 8), pixels).convert("RGB"))
        splits[split].labels.append(row[64])
    return TaskData("digits", [str(d) for d in range(10)], splits, max_length, "image")

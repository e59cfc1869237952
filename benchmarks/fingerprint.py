"""How long a backbone's fingerprint takes: read from the checkpoint files the first time, from the cache after.

    python benchmarks/fingerprint.py --size qwen2.5-0.5b --work runs/memory --out runs/fingerprint.jsonl

The size is one of ``benchmarks/memory.py``'s random-init configs, saved there once in float32 (or any saved
checkpoint folder with ``--folder``). The backbone is loaded in bfloat16, so its fingerprint is read from the
files (widened to float32, one tensor at a time): first with an empty cache, then again with the cache, then
after the weights file's modification time changes (read again). One record with the three times, the
checkpoint's size on disk, and whether the three fingerprints and the float32 load's agree.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def timed(fn):
    started = time.perf_counter()
    value = fn()
    return value, round(time.perf_counter() - started, 3)


def main() -> int:
    from memory import saved

    from adafuse.fusion.backbone import BackboneConfig, load_model
    from adafuse.fusion.fingerprint import fingerprint

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="qwen2.5-0.5b")
    parser.add_argument("--folder", type=Path, help="a saved checkpoint instead of --size")
    parser.add_argument("--work", type=Path, default=Path("runs/memory"))
    parser.add_argument("--out", type=Path, default=Path("runs/fingerprint.jsonl"))
    args = parser.parse_args()
    folder = args.folder or saved(args.work, args.size)
    os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp()  # an empty cache
    model, load_s = timed(lambda: load_model(BackboneConfig(name=str(folder), dtype="bfloat16")))
    first, first_s = timed(lambda: fingerprint(model))
    again = load_model(BackboneConfig(name=str(folder), dtype="bfloat16"))
    cached, cached_s = timed(lambda: fingerprint(again))
    files = sorted(folder.glob("*.safetensors"))
    for path in files:
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    changed, changed_s = timed(lambda: fingerprint(model))
    wide = fingerprint(load_model(BackboneConfig(name=str(folder))))
    record = {
        "checkpoint": args.folder.name if args.folder else args.size,
        "checkpoint_gb": round(sum(p.stat().st_size for p in files) / 1e9, 2),
        "bf16_load_s": load_s, "first_s": first_s, "cached_s": cached_s, "after_change_s": changed_s,
        "first_gb_per_s": round(sum(p.stat().st_size for p in files) / 1e9 / first_s, 2),
        "same_fingerprint": first == cached == changed == wide,
    }  # fmt: skip
    print(json.dumps(record))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

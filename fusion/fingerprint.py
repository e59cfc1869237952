"""The backbone fingerprint: which weights a library's adapters were trained on, whatever dtype they run in.

    fingerprint = sha256( the config (volatile keys removed, sorted JSON),
                          then, per state-dict tensor sorted by name: "name|dtype|shape" and its bytes )

with every floating tensor taken **in float32**: the values a float32 load holds. That makes the fingerprint a
property of the weights, not of ``backbone.dtype``: the same checkpoint loaded in float32, bfloat16 or float16
has one fingerprint, and an adapter trained on one loads on the others. What it guarantees: equal fingerprints
mean the same config and the same stored weights (names, shapes, values); it does not say that two dtypes
compute the same outputs (they differ by the narrower dtype's rounding).

Where the fingerprint comes from:

* a float32 model: its tensors in memory (no files needed);
* a random-init model (``backbone.random_init``): its float32 tensors, hashed when it is built, before any cast;
* a quantized model (``backbone.quantization``): recorded when it is loaded, before quantizing, as above;
* a saved checkpoint loaded in another dtype: its safetensors files, each tensor read as stored and widened to
  float32 (exact: float32 holds every bfloat16 and float16 value), one tensor at a time. The result is cached
  under the files' paths, sizes and modification times (``$XDG_CACHE_HOME/adafuse/fingerprints.json``), so a
  multi-gigabyte checkpoint is read once; a changed file (size or time) is read again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn as nn

from adafuse.fusion.errors import UserError

VOLATILE_CONFIG_KEYS = {"transformers_version", "architectures", "torch_dtype", "dtype", "id2label", "label2id"}
BUILT = "_adafuse_fingerprint"  # attribute a random-init model carries: its float32 fingerprint


def fingerprint(model: nn.Module) -> str:
    """The model's fingerprint (module docstring): recorded at load, else from memory in float32, else files."""
    recorded = getattr(model, BUILT, None)
    if recorded is not None:
        return recorded
    state = model.state_dict()
    if all(t.dtype == torch.float32 for t in state.values() if t.is_floating_point()):
        return _digest(model.config, sorted(state.items()))
    return checkpoint_fingerprint(model)


def record_built(model: nn.Module) -> None:
    """Hash a just-loaded model now, so that its fingerprint survives a cast to a narrower dtype or quantization
    (``load_model`` does this; the backbone is frozen, so the recorded value stays true)."""
    setattr(model, BUILT, fingerprint(model))


def _digest(config, tensors) -> str:
    digest = hashlib.sha256()
    kept = {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k not in VOLATILE_CONFIG_KEYS}
    digest.update(json.dumps(kept, sort_keys=True, default=str).encode())
    for name, tensor in tensors:
        tensor = tensor.detach().cpu()
        if tensor.is_floating_point():
            tensor = tensor.float()
        tensor = tensor.contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def checkpoint_files(model: nn.Module) -> list[Path]:
    """The safetensors files the model was loaded from (its folder, or the Hub cache's snapshot of its name)."""
    source = Path(str(model.config._name_or_path))
    if not source.is_dir():
        with contextlib.suppress(Exception):
            from huggingface_hub import snapshot_download

            source = Path(snapshot_download(str(model.config._name_or_path), local_files_only=True))
    files = sorted(source.glob("*.safetensors")) if source.is_dir() else []
    if not files:
        raise UserError(
            f"backbone '{model.config._name_or_path}': loaded in {model.dtype}, its fingerprint is read from the "
            "checkpoint's safetensors files, and there are none; load it with backbone.dtype: float32"
        )
    return files


def checkpoint_fingerprint(model: nn.Module) -> str:
    """The float32 fingerprint read from the checkpoint files (cached by path, size and modification time)."""
    files = checkpoint_files(model)
    key = json.dumps([[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files])
    cache = _cache_path()
    known = _read_cache(cache)
    if key in known:
        return known[key]
    value = _digest(model.config, _stored_tensors(model, files))
    known[key] = value
    with contextlib.suppress(OSError):  # a cache that cannot be written only costs the next load a re-read
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial = cache.with_suffix(f".{os.getpid()}.partial")
        partial.write_text(json.dumps(known))
        partial.replace(cache)
    return value


def _stored_tensors(model: nn.Module, files: list[Path]):
    """(state-dict name, stored tensor) pairs sorted by name, read lazily; tied tensors read through the name
    the file keeps them under; a name the files lack is refused (the fingerprint would not be the float32 one)."""
    from safetensors import safe_open

    state = model.state_dict()
    by_storage: dict[int, list[str]] = {}
    for name, tensor in state.items():
        by_storage.setdefault(tensor.data_ptr(), []).append(name)
    prefix = f"{model.base_model_prefix}." if getattr(model, "base_model_prefix", "") else ""
    with contextlib.ExitStack() as stack:  # each file opened once, its tensors read one at a time
        handles = [stack.enter_context(safe_open(str(path), framework="pt")) for path in files]
        where = {key: handle for handle in handles for key in handle.keys()}  # noqa: SIM118 (no __iter__)
        located = {}
        for name, tensor in state.items():
            candidates = [c for n in by_storage[tensor.data_ptr()] for c in (n, prefix + n)]
            found = next((c for c in candidates if c in where), None)
            if found is None:
                raise UserError(
                    f"backbone '{model.config._name_or_path}': tensor '{name}' is not in its checkpoint files, so "
                    f"its float32 fingerprint cannot be read from them; load it with backbone.dtype: float32"
                )
            located[name] = found
        for name in sorted(state):
            yield name, where[located[name]].get_tensor(located[name])


def _cache_path() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "adafuse" / "fingerprints.json"


def _read_cache(path: Path) -> dict[str, str]:
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}

"""Shared test helpers: tiny random backbones built from configs (no downloads), fixture paths."""

from __future__ import annotations

import csv
import importlib.util
import os
import random
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# two cores: one process uses both; under pytest-xdist (`-n 2`, as `make test` runs) each worker takes one
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures" / "adapterhub"

_BERT_LIKE = dict(
    vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
    max_position_embeddings=64,
)  # fmt: skip
TINY = {
    "bert": _BERT_LIKE,
    "roberta": {**_BERT_LIKE, "pad_token_id": 1},
    "xlm-roberta": {**_BERT_LIKE, "pad_token_id": 1},
    "electra": {**_BERT_LIKE, "embedding_size": 16},
    "deberta-v2": _BERT_LIKE,
    "distilbert": dict(vocab_size=100, dim=16, n_layers=2, n_heads=2, hidden_dim=32, max_position_embeddings=64),
}
_LLAMA_LIKE = dict(
    vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
)  # fmt: skip
TINY_BEYOND_BERT = {  # decoders and an encoder-decoder: text in, the same task type
    "gpt2": dict(vocab_size=100, n_embd=16, n_layer=2, n_head=2, n_positions=64, pad_token_id=0),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "t5": dict(vocab_size=100, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2, decoder_start_token_id=0),
}
TINY |= TINY_BEYOND_BERT
TINY_VIT = dict(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=32)  # fmt: skip
BREADTH = ROOT.parent / "shared" / "fixtures" / "adapterhub-breadth"


def pytest_collection_modifyitems(config, items):
    """Files with ``@pytest.mark.slow`` tests run first (in their own order: a file's shared runs are made once),
    so that pytest-xdist's workers start the long tests early and end together on short ones.
    ``@pytest.mark.cuda`` tests run where a CUDA device is, and are skipped (with the reason) elsewhere."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow") is not None}
    items.sort(key=lambda item: item.path not in slow_files)  # stable
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device here")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def pytest_configure(config):
    """Refuse ``--dist loadgroup`` where it would not group: pytest 9.2's structured node ids drop the group
    suffix pytest-xdist 3.8 writes (pytest-xdist#1386), so every ``xdist_group``'s tests would spread silently
    over the workers and their shared runs be made once per worker."""
    if config.getoption("dist", default="no") != "loadgroup":
        return
    from importlib.metadata import version

    def release(name: str) -> tuple[int, ...]:
        return tuple(int(part) for part in version(name).split(".")[:3] if part.isdigit())

    if release("pytest") >= (9, 2) and release("pytest-xdist") <= (3, 8, 0):
        raise pytest.UsageError(
            f"pytest {version('pytest')} with pytest-xdist {version('pytest-xdist')} ignores xdist_group "
            "(pytest-xdist#1386): install the pytest the dev extra allows (pip install -e '.[dev]')"
        )


FORGETTING_WORDS = (
    "apple river stone cloud music paper glass tiger orange window garden silver rocket planet forest candle"
)


def forgetting_sequence(folder: Path) -> Path:
    """A sequence built to forget, written into ``folder`` (returns its seq.yaml): two tasks on the same words -
    is one of four keywords among the first two words (A: apple river stone cloud; B: tiger orange window
    garden)? Fully fine-tuning a tiny BERT on B costs A about 0.3 accuracy. The strategies' strengths are set for
    this sequence: A's training drives its loss near zero, so the Fisher is tiny (EWC needs a large λ) and the
    teacher's soft outputs change little until A is lost (LwF's λ_o)."""
    rng, vocab = random.Random(0), FORGETTING_WORDS.split()
    for name, keys in (("a", set(vocab[:4])), ("b", set(vocab[7:11]))):
        with open(folder / f"{name}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            for _ in range(600):
                words = [rng.choice(vocab) for _ in range(8)]
                writer.writerow([" ".join(words), "yes" if keys & set(words[:2]) else "no"])
    task = "{{name: {0}, source: {1}/{0}.csv, validation_ratio: 0.2, test_ratio: 0.2, max_length: 16}}"
    (folder / "seq.yaml").write_text(
        f"""sequence: null
tasks: [{task.format("a", folder)}, {task.format("b", folder)}]
method: full-finetune
strategy: {{base: full-finetune, ewc_lambda: 1.0e+6, lwf_alpha: 100.0, replay_ratio: 0.5}}
max_length: 16
head: {{dropout: 0.0}}
backbone:
  random_init: {{model_type: bert, vocab_size: 30522, hidden_size: 32, num_hidden_layers: 2,
    num_attention_heads: 2, intermediate_size: 64, max_position_embeddings: 64}}
trainer: {{max_epochs: 3, batch_size: 16, eval_batch_size: 128, lr: 0.003, progress_bar: false}}
"""
    )
    return folder / "seq.yaml"


def load_script(path: Path):
    """A script that is not a package module (benchmarks/*.py, docs/generate.py), loaded from its file."""
    spec = importlib.util.spec_from_file_location(f"script_{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_backbone(model_type: str = "bert", seed: int = 0):
    from adafuse.fusion.backbone import BackboneConfig, load_model

    spec = TINY_VIT if model_type == "vit" else TINY[model_type]
    return load_model(BackboneConfig(random_init={"model_type": model_type, **spec}, seed=seed))


def bare_hidden(backbone, batch: dict) -> torch.Tensor:
    """The backbone's own last hidden states (an encoder-decoder's encoder, as adafuse classifies with it)."""
    encoder = backbone.get_encoder() if backbone.config.is_encoder_decoder else backbone
    with torch.no_grad():
        return encoder(**batch).last_hidden_state


def tiny_batch(batch: int = 3, length: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def randomize(module: torch.nn.Module, seed: int = 0, std: float = 0.3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn(param.shape, generator=generator).to(param.device) * std)


VOLATILE = {"wall_time_s", "train_wall_time_s", "reused", "versions"}


def stable(value):
    """metrics.json without what differs between any two runs (wall times, reuse flags, versions)."""
    if isinstance(value, dict):
        return {k: stable(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [stable(v) for v in value]
    return value


@pytest.fixture
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip(f"AdapterHub fixtures not found at {FIXTURES}")
    return FIXTURES

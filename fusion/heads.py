"""Prediction heads by type, AdapterHub-compatible in layout (their state-dict keys are AdapterHub's keys
without the ``heads.<name>.`` prefix).

* ``classification`` / ``image_classification``: ``[dropout -> dense d->d -> tanh] x (layers-1) -> dropout
  -> linear d->labels`` over one pooled vector: the first token (``cls``, BERT and ViT, as AdapterHub with
  ``use_pooler=False``), the last non-padding token (``last``, decoders, as AdapterHub's GPT-2/Llama
  models) or the mask-weighted mean (``mean``).
* ``tagging``: ``[dropout -> dense d->d -> tanh] x (layers-1) -> dropout -> linear d->labels`` on every
  position (AdapterHub's ``TaggingHead``), (B, L, labels) logits.
* ``causal_lm`` / ``seq2seq_lm``: ``[dense d->d -> activation -> layer norm] x (layers-1) -> linear
  d->vocab`` on every position; ``scale`` multiplies the hidden states first (T5 with tied embeddings
  rescales by d_model^-1/2, as transformers and AdapterHub do). The output layer starts as a copy of the
  backbone's word embeddings when given them (tied, as AdapterHub's LM heads), then trains as a head.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from transformers.activations import get_activation

from adafuse.fusion.errors import UserError

POOLINGS = ("auto", "cls", "mean", "last")  # auto: the architecture's own (see adafuse.fusion.sites)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, pooling: str) -> torch.Tensor:
    """(B, L, d) -> (B, d): first token, last non-padding token (left or right padding) or masked mean."""
    if pooling == "cls":
        return hidden[:, 0]
    if attention_mask is None:  # no padding (e.g. image patches): every position is real
        attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
    if pooling == "last":
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)  # (L,)
        last = (attention_mask.to(positions.dtype) * positions).argmax(-1)  # (B,)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def _label_layers(hidden_size: int, num_labels: int, dropout: float, layers: int) -> list[nn.Module]:
    """``[dropout -> dense -> tanh] x (layers-1) -> dropout -> linear``, initialised as AdapterHub's heads."""
    if num_labels < 2:
        raise UserError(f"a classification head needs at least 2 labels, got {num_labels}")
    if layers < 1:
        raise UserError(f"head.layers: {layers} must be >= 1")
    modules: list[nn.Module] = []
    for _ in range(layers - 1):
        modules += [nn.Dropout(dropout), nn.Linear(hidden_size, hidden_size), nn.Tanh()]
    modules += [nn.Dropout(dropout), nn.Linear(hidden_size, num_labels)]
    for module in modules:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
    return modules


class ClassificationHead(nn.Sequential):
    def __init__(
        self, hidden_size: int, num_labels: int, pooling: str = "cls", dropout: float = 0.1, layers: int = 2
    ) -> None:
        if pooling not in POOLINGS[1:]:
            raise UserError(f"head.pooling: '{pooling}' is not one of {', '.join(POOLINGS)}")
        super().__init__(*_label_layers(hidden_size, num_labels, dropout, layers))
        self.pooling = pooling

    @property
    def num_labels(self) -> int:
        return self[-1].out_features

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """(B, L, d) hidden states and (B, L) mask -> (B, num_labels) logits."""
        return super().forward(pool(hidden, attention_mask, self.pooling))


class TaggingHead(nn.Sequential):
    def __init__(self, hidden_size: int, num_labels: int, dropout: float = 0.1, layers: int = 1) -> None:
        super().__init__(*_label_layers(hidden_size, num_labels, dropout, layers))

    @property
    def num_labels(self) -> int:
        return self[-1].out_features

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L, d) hidden states -> (B, L, num_labels) logits (padding positions too; their labels are -100)."""
        return super().forward(hidden)


class LanguageModelHead(nn.Sequential):
    def __init__(
        self,
        hidden_size: int,
        vocab_size: int,
        layers: int = 1,
        activation: str | None = None,
        layer_norm: bool = False,
        bias: bool = False,
        eps: float = 1e-12,
        scale: float = 1.0,
        embeddings: torch.Tensor | None = None,
    ) -> None:
        modules: list[nn.Module] = []
        for _ in range(layers - 1):
            modules.append(nn.Linear(hidden_size, hidden_size))
            if activation:
                modules.append(_Activation(activation))
            if layer_norm:
                modules.append(nn.LayerNorm(hidden_size, eps=eps))
        super().__init__(*modules, nn.Linear(hidden_size, vocab_size, bias=bias))
        self.scale = scale
        if embeddings is not None and embeddings.shape == self[-1].weight.shape:  # start from the word embeddings
            with torch.no_grad():
                self[-1].weight.copy_(embeddings)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L, d) -> (B, L, vocab) logits."""
        return super().forward(hidden * self.scale if self.scale != 1.0 else hidden)


class _Activation(nn.Module):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        try:
            self.fn = get_activation(name.lower())
        except KeyError:
            raise UserError(f"head.activation: unknown activation '{name}'") from None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


HEAD_TYPES = {
    "classification": ClassificationHead,
    "image_classification": ClassificationHead,
    "tagging": TaggingHead,
    "causal_lm": LanguageModelHead,
    "seq2seq_lm": LanguageModelHead,
}


def build_head(hidden_size: int, head_type: str, **options) -> nn.Module:
    """A head of ``head_type`` (a key of :data:`HEAD_TYPES`) from its options."""
    if head_type not in HEAD_TYPES:
        raise UserError(f"head type '{head_type}' is not one of {', '.join(HEAD_TYPES)}")
    head = HEAD_TYPES[head_type](hidden_size, **options)
    head.head_type = head_type
    return head

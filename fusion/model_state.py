"""One artefact's tensors in and out of an :class:`~adafuse.fusion.model.AdaptedModel`, under keys that carry no
artefact name (``"<layer>.<location>.down.weight"``): what the library stores and loads."""

from __future__ import annotations

import torch
import torch.nn as nn

from adafuse.fusion.errors import UserError


class ArtefactTensors:
    """The model's ``*_state`` / ``load_*_state`` methods (it provides ``slots()`` and ``heads``)."""

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        return self._slot_state(name, "adapters")

    def fusion_state(self, name: str) -> dict[str, torch.Tensor]:
        return self._slot_state(name, "fusions")

    def head_state(self, name: str) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.heads[name].state_dict().items()}

    def _slot_state(self, name: str, kind: str) -> dict[str, torch.Tensor]:
        state = {}
        for index, location, slot in self.slots():
            container = getattr(slot, kind)
            if name in container:
                for key, value in container[name].state_dict().items():
                    state[f"{index}.{location}.{key}"] = value.detach().clone()
        return state

    def load_adapter_state(self, name: str, state: dict[str, torch.Tensor]) -> None:
        self._load_slot_state(name, "adapters", state)

    def load_fusion_state(self, name: str, state: dict[str, torch.Tensor]) -> None:
        self._load_slot_state(name, "fusions", state)

    def load_head_state(self, name: str, state: dict[str, torch.Tensor]) -> None:
        _strict_load(self.heads[name], state, f"head '{name}'")

    def _load_slot_state(self, name: str, kind: str, state: dict[str, torch.Tensor]) -> None:
        expected = set(self._slot_state(name, kind))
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise UserError(
                f"{kind[:-1]} '{name}': tensors do not match the model (missing {missing[:3]}, extra {extra[:3]})"
            )
        for index, location, slot in self.slots():
            container = getattr(slot, kind)
            if name in container:
                prefix = f"{index}.{location}."
                part = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
                _strict_load(container[name], part, f"{kind[:-1]} '{name}'")


def _strict_load(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    own = module.state_dict()
    if set(own) != set(state):
        raise UserError(f"{what}: expected tensors {sorted(own)}, got {sorted(state)}")
    for key, value in state.items():
        if own[key].shape != value.shape:
            raise UserError(f"{what}: tensor '{key}' has shape {tuple(value.shape)}, expected {tuple(own[key].shape)}")
    module.load_state_dict(state)

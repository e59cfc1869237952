import pytest
import torch

from adafuse.fusion.errors import UserError
from adafuse.fusion.kinds import AdapterConfig, BottleneckAdapter


def test_new_adapter_delta_is_exactly_zero():
    adapter = BottleneckAdapter(16, AdapterConfig(reduction_factor=4), {})
    x = torch.randn(2, 5, 16)
    assert torch.equal(adapter(x), torch.zeros_like(x))
    assert adapter.down.weight.abs().sum() > 0  # the down-projection is not degenerate


def test_bottleneck_size_from_reduction_factor_or_explicit():
    assert AdapterConfig(reduction_factor=16).size(384) == 24
    assert AdapterConfig(bottleneck=7).size(384) == 7
    assert AdapterConfig(reduction_factor=1000).size(16) == 1


@pytest.mark.parametrize("name", ["relu", "gelu", "swish", "tanh"])
def test_non_linearities(name):
    adapter = BottleneckAdapter(8, AdapterConfig(reduction_factor=2, non_linearity=name), {})
    torch.nn.init.normal_(adapter.up.weight)
    out = adapter(torch.randn(1, 3, 8))
    assert out.shape == (1, 3, 8) and out.abs().sum() > 0


@pytest.mark.parametrize(
    "kwargs", [{"placement": "sideways"}, {"non_linearity": "cubic"}, {"reduction_factor": 0}, {"bottleneck": 0}]
)
def test_bad_config_refused(kwargs):
    with pytest.raises(UserError):
        AdapterConfig(**kwargs)


def test_placements():
    assert AdapterConfig(placement="pfeiffer").locations == ("output",)
    assert AdapterConfig(placement="houlsby").locations == ("attention", "output")
    assert AdapterConfig(placement="pfeiffer").input_is_normed
    assert not AdapterConfig(placement="houlsby").input_is_normed

import pytest
import torch

from adafuse.fusion.bottleneck import BottleneckAdapter, BottleneckConfig
from adafuse.fusion.errors import UserError


def test_new_adapter_delta_is_exactly_zero():
    adapter = BottleneckAdapter(16, BottleneckConfig(reduction_factor=4))
    x = torch.randn(2, 5, 16)
    assert torch.equal(adapter(x), torch.zeros_like(x))
    assert adapter.down.weight.abs().sum() > 0  # the down-projection is not degenerate


def test_bottleneck_size_from_reduction_factor_or_explicit():
    assert BottleneckConfig(reduction_factor=16).size(384) == 24
    assert BottleneckConfig(bottleneck=7).size(384) == 7
    assert BottleneckConfig(reduction_factor=1000).size(16) == 1


@pytest.mark.parametrize("name", ["relu", "gelu", "swish", "tanh"])
def test_non_linearities(name):
    adapter = BottleneckAdapter(8, BottleneckConfig(reduction_factor=2, non_linearity=name))
    torch.nn.init.normal_(adapter.up.weight)
    out = adapter(torch.randn(1, 3, 8))
    assert out.shape == (1, 3, 8) and out.abs().sum() > 0


@pytest.mark.parametrize(
    "kwargs", [{"placement": "sideways"}, {"non_linearity": "cubic"}, {"reduction_factor": 0}, {"bottleneck": 0}]
)
def test_bad_config_refused(kwargs):
    with pytest.raises(UserError):
        BottleneckConfig(**kwargs)


def test_placements():
    assert BottleneckConfig(placement="pfeiffer").locations == ("output",)
    assert BottleneckConfig(placement="houlsby").locations == ("attention", "output")
    assert BottleneckConfig(placement="pfeiffer").input_is_normed
    assert not BottleneckConfig(placement="houlsby").input_is_normed

from pathlib import Path

import pytest
import yaml

from adafuse.continual.config import FuseConfig, RunConfig, apply_overrides, load_config
from adafuse.fusion.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def test_every_config_loads():
    """Each YAML in configs/ parses into its dataclass (the smoke and fusion configs also run in other tests)."""
    assert CONFIGS
    for path in CONFIGS:
        kind = path.parent.name
        if kind == "sequence":
            config = load_config(RunConfig, path)
            assert config.trainer.max_epochs >= 1
        elif kind == "fusion":
            assert load_config(FuseConfig, path).sources
        elif kind == "backbone":
            from adafuse.continual.config import build
            from adafuse.fusion.backbone import BackboneConfig

            build(BackboneConfig, yaml.safe_load(path.read_text()), "backbone")
        else:
            pytest.fail(f"unexpected config folder {kind}")


def test_overrides_and_types():
    config = load_config(
        RunConfig,
        ROOT / "configs/sequence/smoke.yaml",
        ["--trainer.max_epochs", "3", "--adapter.reduction_factor=8", "--trainer.lr", "1e-4"],
    )
    assert config.trainer.max_epochs == 3 and config.adapter.reduction_factor == 8 and config.trainer.lr == 1e-4


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["--trainer.max_epoch", "1"], "unknown key 'trainer.max_epoch'"),
        (["--trainer.max_epochs", "one"], "trainer.max_epochs: 'one' is not a int"),
        (["--adapter.placement", "diagonal"], "adapter.placement"),
        (["--method", "magic"], "method: 'magic'"),
        (["--trainer.max_epochs"], "has no value"),
        (["stray"], "unexpected argument 'stray'"),
        (["--router.lr", "0"], r"router.lr: 0.0 is out of range \(expected > 0.0\)"),
    ],
)
def test_bad_values_refused(overrides, match):
    with pytest.raises(UserError, match=match):
        load_config(RunConfig, ROOT / "configs/sequence/smoke.yaml", overrides)


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(RunConfig, tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="expected a mapping"):
        load_config(RunConfig, tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("a: [1,\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(RunConfig, tmp_path / "broken.yaml")


def test_task_specs_in_yaml():
    data = apply_overrides({"tasks": ["bbc-tech", {"name": "mine", "source": "x.csv", "text_column": "t"}]}, [])
    from adafuse.continual.config import build

    config = build(RunConfig, data)
    assert config.tasks[0] == "bbc-tech" and config.tasks[1].text_column == "t"

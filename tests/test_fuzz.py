"""Random YAML, JSON and CSV thrown at every loader: success or the clean error, nothing else."""

import json
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adafuse.continual.config import FuseConfig, RunConfig, load_config
from adafuse.continual.jobs.predict import read_rows
from adafuse.fusion.errors import UserError, VerificationError
from adafuse.fusion.formats.adapterhub_read import read_adapter_folder, read_fusion_folder
from adafuse.fusion.library import AdapterLibrary
from adafuse.tasks.sources import load_user_task
from adafuse.tasks.spec import TaskSpec

CLEAN = (UserError, VerificationError)
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**6), 10**6), st.floats(allow_nan=True), st.text(max_size=12)
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
RUN_KEYS = ["sequence", "tasks", "method", "seed", "max_length", "backbone", "adapter", "head", "trainer", "monitor"]
SECTION_KEYS = ["lr", "max_epochs", "batch_size", "placement", "reduction_factor", "pooling", "name", "random_init"]
config_like = st.dictionaries(
    st.sampled_from(RUN_KEYS + ["target", "sources", "fusion", "shots"]),
    values | st.dictionaries(st.sampled_from(SECTION_KEYS), values, max_size=3),
    max_size=5,
)


def _file(tmp: Path, name: str, data: str | bytes) -> Path:
    path = tmp / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass"))
    return path


def _clean(call) -> None:
    try:
        call()
    except CLEAN:
        pass


@FUZZ
@given(text=st.text(max_size=200) | config_like.map(lambda d: yaml.safe_dump(d)))
def test_config_loaders(text):
    with tempfile.TemporaryDirectory() as tmp:
        path = _file(Path(tmp), "c.yaml", text)
        _clean(lambda: load_config(RunConfig, path))
        _clean(lambda: load_config(FuseConfig, path))


@FUZZ
@given(
    manifest=values
    | st.fixed_dictionaries({"format": st.just("adafuse-library"), "version": st.just(1), "artefacts": values})
)
def test_library_manifest(manifest):
    with tempfile.TemporaryDirectory() as tmp:
        _file(Path(tmp), "manifest.json", json.dumps(manifest))
        library = AdapterLibrary(tmp)
        assert isinstance(library.verify(), list)
        _clean(library.entries)
        _clean(lambda: library.load("adapter", "a"))


@FUZZ
@given(meta=st.dictionaries(st.sampled_from(["config", "name", "adapter_names", "model_type", "hidden_size"]), values))
def test_adapterhub_configs(meta):
    with tempfile.TemporaryDirectory() as tmp:
        _file(Path(tmp), "adapter_config.json", json.dumps(meta))
        _file(Path(tmp), "adapter_fusion_config.json", json.dumps(meta))
        _clean(lambda: read_adapter_folder(Path(tmp), {}))
        _clean(lambda: read_fusion_folder(Path(tmp), {}))


rows = st.lists(st.lists(st.text(max_size=10), min_size=1, max_size=4), max_size=6)


@FUZZ
@given(
    header=st.lists(st.sampled_from(["text", "label", "task", "x", ""]), min_size=1, max_size=4),
    body=rows,
    raw=st.binary(max_size=80),
)
def test_data_files(header, body, raw):
    csv_text = ",".join(header) + "\n" + "\n".join(",".join(r) for r in body)
    jsonl = "\n".join(json.dumps(dict(zip(header, r, strict=False))) for r in body)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, data in (("d.csv", csv_text), ("d.jsonl", jsonl), ("r.csv", raw), ("r.jsonl", raw)):
            path = _file(tmp, name, data)
            _clean(lambda path=path: list(read_rows(path, "text", "task")))
            spec = TaskSpec(name="fuzz", source=str(path), validation_ratio=0.2, test_ratio=0.2)
            _clean(lambda spec=spec: load_user_task(spec, tmp))

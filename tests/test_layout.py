"""The package layout: every folder of code is a package that the distribution lists, and the jobs share
their plumbing through one module instead of reaching into each other."""

import ast
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
TOPS = ("fusion", "continual", "tasks")


def test_every_code_folder_is_a_listed_package():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        "adafuse." + ".".join(init.parent.relative_to(ROOT).parts)
        for top in TOPS
        for init in (ROOT / top).rglob("__init__.py")
    }
    assert found == listed
    strays = [p for top in TOPS for p in (ROOT / top).rglob("*.py") if not (p.parent / "__init__.py").is_file()]
    assert strays == []


def test_no_job_imports_another_job():
    """The jobs share ``job.py``, ``library_model.py`` and ``predictor.py`` (and fusion uses ``rank``); none reaches
    into the sequence runner or another job."""
    jobs = ROOT / "continual" / "jobs"
    shared = {f"adafuse.continual.jobs.{m}" for m in ("job", "library_model", "predictor", "rank")}
    for path in jobs.glob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        own = f"adafuse.continual.jobs.{path.stem}_"  # a job's own helper modules, e.g. serve_metrics
        others = {m for m in imported if m.startswith("adafuse.continual.jobs.") and m not in shared}
        others = {m for m in others if not m.startswith(own)}
        assert others == set(), f"{path.name} imports {others}"


def test_predict_and_serve_start_without_the_training_stack():
    """Predicting and serving import neither Lightning nor torchmetrics (seconds at every start): the task types
    import their metrics when training or evaluation first asks for them."""
    loaded = "[m for m in ('lightning', 'torchmetrics') if m in sys.modules]"
    code = f"import sys, adafuse.continual.jobs.serve, adafuse.continual.jobs.predict; print({loaded})"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

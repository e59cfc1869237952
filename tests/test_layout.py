"""The package layout: every folder of code is a package that the distribution lists, and the jobs share
their plumbing through one module instead of reaching into each other."""

import ast
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


def _module_file(module: str) -> Path | None:
    """The file of an ``adafuse.*`` module or package, if there is one."""
    parts = module.split(".")
    if parts[0] != "adafuse" or len(parts) < 2 or parts[1] not in TOPS:
        return None
    base = ROOT.joinpath(*parts[1:])
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imported_at_load(module: str) -> set[str]:
    """Every module that importing ``module`` imports: module-level imports (not those inside functions or under
    ``if TYPE_CHECKING``), followed through adafuse's own modules and the packages above them."""
    seen, todo, outside = set(), [module], set()
    while todo:
        name = todo.pop()
        parents = [".".join(name.split(".")[:i]) for i in range(2, name.count(".") + 1)]
        for current in [name, *parents]:
            path = _module_file(current)
            if current in seen or path is None:
                continue
            seen.add(current)
            for node in ast.parse(path.read_text()).body:  # module level only
                names = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
                for imported in names:
                    if imported.startswith("adafuse."):
                        todo.append(imported)
                    else:
                        outside.add(imported)
    return outside


def test_predict_and_serve_start_without_the_training_stack():
    """Predicting and serving import neither Lightning nor torchmetrics (seconds at every start): the task types
    import their metrics when training or evaluation first asks for them."""
    for job in ("serve", "predict"):
        loaded = {name.split(".")[0] for name in _imported_at_load(f"adafuse.continual.jobs.{job}")}
        assert "torch" in loaded and not loaded & {"lightning", "torchmetrics"}, (job, loaded)
    assert "lightning" in {n.split(".")[0] for n in _imported_at_load("adafuse.continual.jobs.run")}  # the walk finds
    assert "torchmetrics" in {n.split(".")[0] for n in _imported_at_load("adafuse.tasks.types.metrics")}  # both

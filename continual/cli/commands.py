"""The handlers behind each ``adafuse`` subcommand (thin wrappers over library functions)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from adafuse.continual.config import DEFAULT_TOP_K, FuseConfig, RunConfig, load_config
from adafuse.continual.runtime.distributed import is_main
from adafuse.fusion.errors import UserError, VerificationError
from adafuse.fusion.library import AdapterLibrary
from adafuse.fusion.storage import atomic_write


def _out_dir(args, config_path: str, suffix: str = "") -> Path:
    return Path(args.out) if args.out else Path("runs") / (Path(config_path).stem + suffix)


def _log():
    """Progress lines from the writer process only (under DDP every rank runs the same loop)."""
    return print if is_main() else lambda *_args, **_kwargs: None


def _quiet_lightning() -> None:
    """Lightning's INFO lines (GPU available, tips) are not for our users; it sets its level on import."""
    import logging

    import lightning.pytorch  # noqa: F401 - imported first so that the level below sticks

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)


def cmd_run(args, overrides: list[str]) -> int:
    from adafuse.continual.jobs.run import run_sequence

    _quiet_lightning()
    if args.method:
        overrides = [*overrides, "--method", args.method]
    config = load_config(RunConfig, args.config, overrides)
    out = _out_dir(args, args.config)
    library = Path(args.library) if args.library else None
    metrics = run_sequence(config, out, library, Path(args.config).parent, log=_log())
    if not is_main():
        return 0
    print(
        f"\nACC {metrics['acc']:.4f}  BWT {_f(metrics['bwt'])}  forgetting {_f(metrics['forgetting'])}  "
        f"FWT {_f(metrics['fwt'])}"
    )
    print(f"report: {out / 'report.md'}  metrics: {out / 'metrics.json'}  library: {args.library or out / 'library'}")
    return 0


def cmd_fuse(args, overrides: list[str]) -> int:
    from adafuse.continual.jobs.fuse import run_fusion

    _quiet_lightning()
    if args.composition:
        overrides = [*overrides, "--fusion.composition", args.composition]
    config = load_config(FuseConfig, args.config, [*overrides, *_source_overrides(args.sources, args.top_k)])
    out = _out_dir(args, args.config, "-baseline" if args.baseline else "")
    base = Path(args.config).parent
    metrics = run_fusion(config, Path(args.library), out, baseline=args.baseline, base_dir=base, log=_log())
    if not is_main():
        return 0
    scores = ", ".join(f"{name} {value:.4f}" for name, value in metrics["test"].items())
    print(f"\n{metrics['method']} on {metrics['target']}: test {scores}")
    print(f"report: {out / 'report.md'}  metrics: {out / 'metrics.json'}")
    return 0


def _source_overrides(sources: str | None, top_k: int | None) -> list[str]:
    """``--sources auto --top-k K`` / ``--sources all`` / ``--sources a,b`` as config overrides of ``sources``;
    ``--top-k K`` alone means ``--sources auto --top-k K``, whatever the config lists."""
    if top_k is not None and top_k < 1:
        raise UserError(f"--top-k {top_k}: expected an integer >= 1")
    if sources is None and top_k is None:
        return []
    if sources in (None, "auto"):
        return ["--sources", f"{{auto: {DEFAULT_TOP_K if top_k is None else top_k}}}"]
    if top_k is not None:
        raise UserError(f"--top-k {top_k}: only with --sources auto (found --sources {sources})")
    if sources == "all":
        return ["--sources", "all"]
    names = [name.strip() for name in sources.split(",") if name.strip()]
    if not names:
        raise UserError("--sources: expected auto, all or comma-separated adapter names")
    return ["--sources", json.dumps(names)]


def cmd_library_rank(args, _overrides=()) -> int:
    from adafuse.continual.jobs.fuse import rank_for_config
    from adafuse.continual.reporting.report import ranking_markdown

    overrides = _source_overrides("auto" if args.top_k else None, args.top_k)
    if args.proxy:
        overrides += ["--ranking.proxy", args.proxy]
    config = load_config(FuseConfig, args.config, overrides)
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print  # stdout carries only the JSON
    ranking = rank_for_config(config, Path(args.library), Path(args.config).parent, log=log)
    print(json.dumps(ranking, indent=2) if args.json else ranking_markdown(ranking))
    return 0


def _f(value) -> str:
    return "–" if value is None else f"{value:+.4f}"


def cmd_report(args, _overrides=()) -> int:
    from adafuse.continual.reporting.report import read_metrics, write_comparison, write_fusion_report, write_run_report

    runs = [(Path(d), read_metrics(Path(d))) for d in args.dirs]
    for folder, metrics in runs:
        (write_run_report if "tasks" in metrics else write_fusion_report)(folder, metrics)
        print(f"{folder / 'report.md'}")
    if len(runs) > 1:
        out = Path(args.out) if args.out else runs[0][0]
        write_comparison(runs, out)
        print(f"{out / 'comparison.md'}")
    return 0


def _library(folder: str) -> AdapterLibrary:
    library = AdapterLibrary(folder)
    if not library.exists():
        raise UserError(f"'{folder}' is not an adapter library (no manifest.json)")
    return library


def cmd_library_list(args, _overrides=()) -> int:
    library = _library(args.dir)
    entries = library.entries()
    print(f"{'kind':<8} {'name':<32} {'task':<24} {'val acc':>8}  sha256")
    for e in entries:
        acc = (e.get("metrics") or {}).get("val_accuracy")
        print(
            f"{e['kind']:<8} {e['name']:<32} {str(e.get('task')):<24} {'' if acc is None else f'{acc:.4f}':>8}  "
            f"{e['sha256'][:16]}"
        )
    print(f"{len(entries)} artefacts; backbone {library.read_manifest()['backbone']['fingerprint'][:16]}")
    return 0


def cmd_library_show(args, _overrides=()) -> int:
    library = _library(args.dir)
    matches = [e for e in library.entries(args.kind) if e["name"] == args.name]
    if not matches:
        raise UserError(f"library '{args.dir}' has no artefact named '{args.name}'")
    print(json.dumps(matches if len(matches) > 1 else matches[0], indent=2))
    return 0


def cmd_library_verify(args, _overrides=()) -> int:
    library = AdapterLibrary(args.dir)
    if not Path(args.dir).is_dir():
        raise UserError(f"library folder '{args.dir}' not found")
    problems = library.verify()
    if problems:
        for problem in problems:
            print(problem)
        raise VerificationError(f"{len(problems)} problem(s) in '{args.dir}'")
    count = len(library.entries())
    print(f"ok: {count} artefacts verified in '{args.dir}'")
    return 0


def cmd_library_import(args, _overrides=()) -> int:
    from adafuse.continual.jobs.interop import import_adapterhub, import_peft

    read = import_peft if args.source_format == "peft" else import_adapterhub
    read(Path(args.dir), Path(args.library), args.backbone, args.name)
    return 0


def cmd_library_export(args, _overrides=()) -> int:
    from adafuse.continual.jobs.interop import export_adapterhub, export_peft

    if args.target_format == "peft":
        out = export_peft(Path(args.library), args.name, Path(args.out), args.backbone)
    else:
        out = export_adapterhub(Path(args.library), args.name, Path(args.out), args.backbone, args.kind)
    layout = {"peft": "PEFT", "adapterhub": "AdapterHub"}[args.target_format]
    print(f"exported '{args.name}' in {layout} layout to {out}")
    return 0


def cmd_predict(args, _overrides=()) -> int:
    from adafuse.continual.jobs.predict import run_predict

    options = ("adapter", "fusion", "task_column", "task", "text_column", "batch_size", "max_length", "device")
    options += ("drop_layers", "backbone", "merge", "compile", "precision")  # run_predict's keywords, as the flags
    count = run_predict(
        Path(args.library), Path(args.input), Path(args.out), **{name: getattr(args, name) for name in options}
    )
    print(f"{count} predictions -> {args.out}")
    return 0


def cmd_serve(args, _overrides=()) -> int:
    from adafuse.continual.jobs.serve import ServeOptions, run_server

    names = ("host", "port", "device", "precision", "max_batch_rows", "max_wait_ms", "max_rows", "max_chars")
    names += ("max_length", "max_loaded", "release_every", "token", "backbone")
    options = {name: getattr(args, name) for name in names}
    return run_server(ServeOptions(Path(args.library), **options))


def cmd_tasks_list(args, _overrides=()) -> int:
    from adafuse.tasks.builtin import SEQUENCES, load_builtin, task_names

    print(f"{'task':<26} {'train':>6} {'valid':>6} {'test':>6}  type: labels")
    for name in task_names():
        try:
            data = load_builtin(name)
        except UserError as err:  # an optional package is missing (digits: scikit-learn)
            print(f"{name:<26} {err}")
            continue
        sizes = data.sizes()
        print(
            f"{name:<26} {sizes['train']:>6} {sizes['validation']:>6} {sizes['test']:>6}  "
            f"{data.type}: {', '.join(data.label_names) or 'free text'}"
        )
    for name, members in SEQUENCES.items():
        print(f"sequence {name}: {' -> '.join(members)}")
    return 0


def cmd_tasks_export(args, _overrides=()) -> int:
    from adafuse.tasks.builtin import SEQUENCES, load_builtin
    from adafuse.tasks.types import task_type

    names = SEQUENCES.get(args.name, [args.name])
    tasks = [load_builtin(n) for n in names]  # raises for unknown names before anything is written
    out = Path(args.out)
    for task in tasks:
        folder = out / task.name if args.name in SEQUENCES else out
        for split, data in task.splits.items():
            row = task_type(task.type).example  # the columns a task spec of the type reads by default
            lines = [
                json.dumps(row(t, y, task.label_names), ensure_ascii=False)
                for t, y in zip(data.texts, data.labels, strict=True)
            ]
            atomic_write(folder / f"{split}.jsonl", ("\n".join(lines) + "\n").encode())
        print(f"{folder}: " + ", ".join(f"{s} {len(d)}" for s, d in task.splits.items()))
    return 0

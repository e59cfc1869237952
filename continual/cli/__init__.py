"""The ``adafuse`` command line: run, fuse, report, library, tasks.

Exit codes: 0 success; 1 a verification failed (damaged or changed library files); 2 a user mistake or
an environment problem (bad config or data, missing file, full disk), told in one line on stderr;
3 an internal error (a bug: one line too; ``--debug`` or ``ADAFUSE_DEBUG=1`` shows the traceback);
130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings

from adafuse.continual.names import METHODS
from adafuse.continual.runtime.allocator import tune_malloc
from adafuse.fusion.errors import UserError, VerificationError, first_line
from adafuse.fusion.layout import KIND_FOLDERS


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints the usage block too)
        raise UserError(f"{self.prog}: {message}")


_BACKBONE_HELP = "backbone name, folder or YAML (default: the one the library records, else the embedded MiniLM)"
_PRECISION_HELP = "autocast: 32 (default, float32), bf16-mixed (CUDA, or a CPU with bf16 instructions), 16-mixed (CUDA)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="adafuse", description="Continual learning with adapters and AdapterFusion.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="train a task sequence -> library, accuracy matrix, metrics, report")
    run.add_argument("config", help="YAML config (configs/sequence/*.yaml)")
    run.add_argument("--out", default=None, help="output folder (default: runs/<config name>)")
    run.add_argument("--library", default=None, help="append to this library instead of OUT/library")
    run.add_argument("--method", default=None, help=f"overrides the config's method: {' | '.join(METHODS)}")
    run.set_defaults(handler="cmd_run")

    fuse = sub.add_parser("fuse", help="train AdapterFusion over library adapters for a target task")
    fuse.add_argument("config", help="YAML config (configs/fusion/*.yaml)")
    fuse.add_argument("--library", required=True, help="the adapter library holding the source adapters")
    fuse.add_argument("--out", default=None, help="output folder (default: runs/<config name>-fusion)")
    fuse.add_argument(
        "--baseline",
        choices=["single-adapter"],
        default=None,
        help="train a fresh single adapter on the target instead (same budget, same metrics schema)",
    )
    fuse.add_argument(
        "--composition",
        choices=["attention", "weighted"],
        default=None,
        help="attention: AdapterFusion over bottleneck/parallel/compacter sources; weighted: LoraHub over LoRA "
        "sources (same as --fusion.composition)",
    )
    fuse.add_argument(
        "--sources",
        default=None,
        help="auto (rank the library and fuse the best --top-k), all, or comma-separated adapter names",
    )
    fuse.add_argument("--top-k", type=int, default=None, help="how many to fuse (default 5); implies --sources auto")
    fuse.set_defaults(handler="cmd_fuse")

    report = sub.add_parser("report", help="re-render reports; several folders side by side")
    report.add_argument("dirs", nargs="+", help="output folders of 'adafuse run' / 'adafuse fuse'")
    report.add_argument("--out", default=None, help="where the side-by-side comparison goes (default: first DIR)")
    report.set_defaults(handler="cmd_report")

    library = sub.add_parser("library", help="inspect and verify an adapter library")
    lib_sub = library.add_subparsers(dest="library_command", required=True, parser_class=_Parser)
    for name, text in (
        ("list", "list artefacts"),
        ("show", "show one artefact's manifest entry"),
        ("verify", "recompute every sha256 and check the library (exit 1 on any problem)"),
    ):
        p = lib_sub.add_parser(name, help=text)
        p.add_argument("dir", help="library folder")
        if name == "show":
            p.add_argument("name", help="artefact name")
            p.add_argument("--kind", default=None, choices=list(KIND_FOLDERS))
        p.set_defaults(handler=f"cmd_library_{name}")
    rank = lib_sub.add_parser("rank", help="rank the library's adapters as sources for a fusion target (no training)")
    rank.add_argument("config", help="fusion YAML config naming the target (configs/fusion/*.yaml)")
    rank.add_argument("--library", required=True, help="the adapter library to rank")
    rank.add_argument("--top-k", type=int, default=None, help="how many would be chosen (default: the config's K)")
    rank.add_argument("--proxy", choices=["leep", "probe"], default=None, help="ranking proxy (default: the config's)")
    rank.add_argument("--json", action="store_true", help="print the ranking as JSON")
    rank.set_defaults(handler="cmd_library_rank")
    imp = lib_sub.add_parser("import", help="import an AdapterHub adapter/fusion/head folder or a PEFT LoRA folder")
    imp.add_argument(
        "dir", help="folder written by AdapterHub save_adapter(_fusion) / save_head or PEFT save_pretrained"
    )
    imp.add_argument("--from", dest="source_format", choices=["adapterhub", "peft"], default="adapterhub")
    imp.add_argument("--library", required=True, help="library to import into (created if missing)")
    imp.add_argument("--name", default=None, help="name in the library (default: the saved name)")
    imp.add_argument("--backbone", default=None, help=_BACKBONE_HELP)
    imp.set_defaults(handler="cmd_library_import")
    exp = lib_sub.add_parser("export", help="write an adapter or fusion (and its head) in AdapterHub's layout")
    exp.add_argument("name", help="adapter or fusion name")
    exp.add_argument("--library", required=True, help="the library holding it")
    exp.add_argument("--to", dest="target_format", choices=["adapterhub", "peft"], default="adapterhub")
    exp.add_argument("--out", required=True, help="new (or empty) output folder")
    exp.add_argument("--kind", default=None, choices=["adapter", "fusion", "head"])
    exp.add_argument("--backbone", default=None, help=_BACKBONE_HELP)
    exp.set_defaults(handler="cmd_library_export")

    predict = sub.add_parser("predict", help="label a file with a library adapter, fusion, or one per row")
    predict.add_argument("--library", required=True, help="adapter library")
    which = predict.add_mutually_exclusive_group(required=True)
    which.add_argument("--adapter", default=None, help="adapter (and head of the same name) for every row")
    which.add_argument("--fusion", default=None, help="fusion (and head of the same name) for every row")
    which.add_argument("--task-column", default=None, help="column naming each row's adapter or fusion")
    which.add_argument(
        "--task",
        choices=["auto"],
        default=None,
        help="auto: each row's adapter chosen by the library's routers (stored by class-incremental runs)",
    )
    predict.add_argument("--input", required=True, help="CSV/TSV/JSONL with a text column, or plain text lines")
    predict.add_argument("--out", required=True, help="output JSONL, one line per input row")
    predict.add_argument("--text-column", default="text", help="text column or field (default: text)")
    predict.add_argument("--batch-size", type=int, default=32)
    predict.add_argument("--max-length", type=int, default=128, help="tokens per text (default: 128)")
    predict.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    predict.add_argument("--precision", default="32", help=_PRECISION_HELP)
    predict.add_argument("--drop-layers", type=int, default=0, help="AdapterDrop: skip adapters of the lowest N layers")
    predict.add_argument("--backbone", default=None, help=_BACKBONE_HELP)
    predict.add_argument(
        "--merge", action="store_true", help="fold the LoRA --adapter into the weights first (the bare model's speed)"
    )
    predict.add_argument(
        "--compile",
        default="off",
        help="torch.compile the forward: off (default), default, reduce-overhead, max-autotune",
    )
    predict.set_defaults(handler="cmd_predict")

    serve = sub.add_parser("serve", help="serve every adapter and fusion of a library over HTTP, batched across tasks")
    serve.add_argument("--library", required=True, help="adapter library (new entries are served without a restart)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    serve.add_argument("--precision", default="32", help=_PRECISION_HELP)
    serve.add_argument("--max-batch-rows", type=int, default=64, help="rows gathered into one forward pass")
    serve.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits for more rows")
    serve.add_argument("--max-rows", type=int, default=256, help="inputs one request may send")
    serve.add_argument("--max-chars", type=int, default=20_000, help="characters one input may have")
    serve.add_argument("--max-length", type=int, default=128, help="tokens per text (default: 128)")
    serve.add_argument(
        "--max-loaded", type=int, default=32, help="adapters and fusions kept loaded, least recently used go (0: all)"
    )
    serve.add_argument(
        "--release-every",
        type=int,
        default=1,
        help="forward passes between returns of free memory to the OS (0: off)",
    )
    serve.add_argument("--token", default=None, help="bearer token every request must carry (or ADAFUSE_SERVE_TOKEN)")
    serve.add_argument("--backbone", default=None, help=_BACKBONE_HELP)
    serve.set_defaults(handler="cmd_serve")

    tasks = sub.add_parser("tasks", help="built-in tasks")
    tasks_sub = tasks.add_subparsers(dest="tasks_command", required=True, parser_class=_Parser)
    tasks_sub.add_parser("list", help="built-in tasks with split sizes and labels").set_defaults(
        handler="cmd_tasks_list"
    )
    export = tasks_sub.add_parser("export", help="write a task's splits as JSONL")
    export.add_argument("name", help="task or sequence name")
    export.add_argument("--out", required=True, help="output folder")
    export.set_defaults(handler="cmd_tasks_export")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("ADAFUSE_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tune_malloc()
    for category in (UserWarning, FutureWarning, DeprecationWarning):  # Lightning's advice is not for our users
        warnings.filterwarnings("ignore", category=category, module="lightning")
    # transformers imports torchao wherever it is installed: its optional CUDA kernels and its type registrations
    # log a line each on import, about nothing a user of this command can act on
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        args, extra = build_parser().parse_known_args(argv)
        if extra and args.command not in ("run", "fuse"):
            raise UserError(f"unrecognized arguments: {' '.join(extra)}")
        from adafuse.continual.cli import commands  # torch, transformers, Lightning: once the arguments parse

        return int(getattr(commands, args.handler)(args, extra) or 0)
    except Exception as err:
        if debug:
            raise
        code, message = _failure(err)
        print(f"adafuse: {message}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print("adafuse: interrupted", file=sys.stderr)
        return 130


def _failure(err: Exception) -> tuple[int, str]:
    """Exit code and one-line message for an exception that ends a command."""
    if isinstance(err, UserError):
        return 2, f"error: {err}"
    if isinstance(err, VerificationError):
        return 1, f"verification failed: {err}"
    if isinstance(err, OSError):
        where = f" '{err.filename}'" if err.filename else ""
        return 2, f"error:{where} {err.strerror or err}"
    return 3, f"internal error: {type(err).__name__}: {first_line(err)} (run again with --debug for the traceback)"


def print_json(data) -> None:
    print(json.dumps(data, indent=2))

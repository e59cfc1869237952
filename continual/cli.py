"""The ``adafuse`` command line: run, fuse, report, library, tasks.

User mistakes end with one line on stderr and exit code 2; failed verification with exit code 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings

from adafuse.fusion.errors import UserError, VerificationError

from . import commands


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints the usage block too)
        raise UserError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="adafuse", description="Continual learning with adapters and AdapterFusion.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="train a task sequence -> library, accuracy matrix, metrics, report")
    run.add_argument("config", help="YAML config (configs/sequence/*.yaml)")
    run.add_argument("--out", default=None, help="output folder (default: runs/<config name>)")
    run.add_argument("--library", default=None, help="append to this library instead of OUT/library")
    run.add_argument("--method", default=None, help="adapters | shared-adapter | full-finetune")
    run.set_defaults(handler=commands.cmd_run)

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
    fuse.set_defaults(handler=commands.cmd_fuse)

    report = sub.add_parser("report", help="re-render reports; several folders side by side")
    report.add_argument("dirs", nargs="+", help="output folders of 'adafuse run' / 'adafuse fuse'")
    report.add_argument("--out", default=None, help="where the side-by-side comparison goes (default: first DIR)")
    report.set_defaults(handler=commands.cmd_report)

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
            p.add_argument("--kind", default=None, choices=["adapter", "head", "fusion"])
        p.set_defaults(handler=getattr(commands, f"cmd_library_{name}"))

    tasks = sub.add_parser("tasks", help="built-in tasks")
    tasks_sub = tasks.add_subparsers(dest="tasks_command", required=True, parser_class=_Parser)
    tasks_sub.add_parser("list", help="built-in tasks with split sizes and labels").set_defaults(
        handler=commands.cmd_tasks_list
    )
    export = tasks_sub.add_parser("export", help="write a task's splits as JSONL")
    export.add_argument("name", help="task or sequence name")
    export.add_argument("--out", required=True, help="output folder")
    export.set_defaults(handler=commands.cmd_tasks_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=UserWarning, module="lightning")
    try:
        args, extra = build_parser().parse_known_args(argv)
        if extra and args.command not in ("run", "fuse"):
            raise UserError(f"unrecognized arguments: {' '.join(extra)}")
        return int(args.handler(args, extra) or 0)
    except UserError as err:
        print(f"adafuse: error: {err}", file=sys.stderr)
        return 2
    except VerificationError as err:
        print(f"adafuse: verification failed: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("adafuse: interrupted", file=sys.stderr)
        return 130


def print_json(data) -> None:
    print(json.dumps(data, indent=2))


if __name__ == "__main__":
    sys.exit(main())

"""The documentation: generated pages current, every benchmark table traced to a record, and the project speaking
of the software only (no development history, work-round or issue numbers, or plans in any tracked file)."""

import re
import subprocess
from pathlib import Path

import yaml
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]


def _generator():
    return load_script(ROOT / "docs" / "generate.py")


def test_generated_pages_are_current():
    assert _generator().stale_pages() == [], "run: python docs/generate.py"


def test_every_config_key_is_documented_with_type_and_default():
    generator = _generator()
    text = generator.config_reference()
    for section, cls in generator.config_sections():
        for name in cls.__dataclass_fields__:
            assert f"| `{name}` |" in text, (section, name)


def test_the_cli_reference_names_every_subcommand_and_option():
    from adafuse.continual.cli import build_parser

    text = _generator().cli_reference()
    for line in build_parser().format_help().splitlines():
        for command in re.findall(r"\{([a-z,]+)\}", line):
            for name in command.split(","):
                assert f"## adafuse {name}" in text
    assert "`--top-k`" in text and "`--task-column`" in text


def test_every_benchmark_record_exists_with_its_command_machine_and_date():
    catalog = yaml.safe_load((ROOT / "benchmarks" / "records.yaml").read_text())
    for page in catalog["pages"].values():
        for record in page["records"]:
            assert (ROOT / "benchmarks" / record["file"]).is_file(), record["file"]
            assert record["command"] and record["machine"] and record["date"]


HISTORY = re.compile(
    r"\bsessions?\b|\bissues? ?#?\d|\bwork[- ]rounds?\b|\bround \d|\bnext (session|round)\b|\bfuture (gpu|work|run)",
    re.IGNORECASE,
)


def test_the_project_speaks_of_the_software_only():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    found = []
    for name in tracked.splitlines():
        path = ROOT / name
        if HISTORY.search(name):
            found.append(f"{name} (file name)")
        if name == "tests/test_docs.py" or not path.is_file() or path.suffix in {".png", ".safetensors"}:
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if HISTORY.search(line):
                found.append(f"{name}:{number}: {line.strip()[:80]}")
    assert found == []

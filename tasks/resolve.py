"""From config entries (names or specs) to loaded, checked TaskData."""

from __future__ import annotations

from pathlib import Path

from adafuse.fusion.errors import UserError
from adafuse.tasks.builtin import SEQUENCES, is_builtin, load_builtin, unknown_task
from adafuse.tasks.sources import load_user_task
from adafuse.tasks.spec import TaskData, TaskSpec


def resolve_task(item: TaskSpec | str, base_dir: Path, cache_dir: Path | None, max_length: int = 128) -> TaskData:
    spec = TaskSpec(name=item, max_length=max_length) if isinstance(item, str) else item
    if spec.source is None:
        if not is_builtin(spec.name):
            raise unknown_task(spec.name)
        return load_builtin(spec.name, shots=spec.shots, max_length=spec.max_length)
    return load_user_task(spec, base_dir, cache_dir)


def sequence_items(sequence: str | None, tasks: list[TaskSpec | str] | None) -> list[TaskSpec | str]:
    if tasks:
        items = list(tasks)
    elif sequence is not None:
        if sequence not in SEQUENCES:
            raise UserError(f"unknown sequence '{sequence}'; built-in sequences: {', '.join(SEQUENCES)}")
        items = list(SEQUENCES[sequence])
    else:
        raise UserError("the config names neither a 'sequence' nor a list of 'tasks'")
    names = [i if isinstance(i, str) else i.name for i in items]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UserError(f"task names must be unique in a sequence; repeated: {', '.join(duplicates)}")
    return items


def resolve_sequence(
    sequence: str | None,
    tasks: list[TaskSpec | str] | None,
    base_dir: Path,
    cache_dir: Path | None,
    max_length: int = 128,
) -> list[TaskData]:
    return [resolve_task(item, base_dir, cache_dir, max_length) for item in sequence_items(sequence, tasks)]

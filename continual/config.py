"""Run configuration: dataclasses loaded from YAML, every key overridable on the command line.

``load_config(RunConfig, "configs/sequence/smoke.yaml", ["--trainer.max_epochs", "1"])`` reads the file,
applies ``--dotted.key value`` overrides (values parsed as YAML scalars), and builds the dataclasses,
refusing unknown keys and wrong types with a message naming the file, key, value and expected type.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from adafuse.continual.names import METHODS, STRATEGY_METHODS
from adafuse.continual.runtime.hardware import check_hardware
from adafuse.continual.strategies import StrategyConfig
from adafuse.fusion.attention import FusionConfig
from adafuse.fusion.backbone import BackboneConfig
from adafuse.fusion.compiling import check_mode
from adafuse.fusion.errors import UserError, first_line
from adafuse.fusion.heads import POOLINGS
from adafuse.fusion.kinds import AdapterConfig
from adafuse.tasks.spec import TaskSpec

TRAINER_STRATEGIES = ("auto", "ddp", "fsdp")  # those adafuse's rank-0 writes and gathers are tested with
SETTINGS = ("task-incremental", "class-incremental")  # is the task given at test time?
ROUTERS = ("lda", "trained")  # class-incremental task identification for isolated adapters


@dataclass
class TrainerConfig:
    """Training loop settings (passed to Lightning's Trainer where they are Trainer options).

    Attributes:
        max_epochs: passes over a task's training split (the best epoch on validation is kept).
        batch_size: training examples per batch.
        accumulate_grad_batches: one optimizer step per N batches: an effective batch of N × ``batch_size``
            where memory holds only ``batch_size`` (each batch of a step gets its own dropout seed).
        eval_batch_size: examples per batch in evaluation, the monitor and ranking.
        lr: AdamW learning rate of adapters and fusion layers.
        head_lr: the heads' learning rate (default: ``lr``).
        weight_decay: AdamW weight decay.
        warmup_ratio: share of the steps with a linear warm-up, then linear decay to 0 (in [0, 1)).
        gradient_clip_val: clip the gradient norm at this value (null: no clipping).
        activation_checkpointing: recompute each frozen block's forward (its adapters and fusion included) in the
            backward pass instead of keeping its activations: less memory for more compute, the same gradients.
        compile: ``torch.compile`` the training step (forward and loss) and the forward of validation and the
            monitor's evaluations: ``off``, ``default``, ``reduce-overhead`` (CUDA graphs on CUDA), ``max-autotune``,
            or ``auto`` (times eager and compiled steps and keeps compiling where the steps left repay the
            compile time; prints its decision). Pair it with ``pad_to_multiple_of`` so a few shapes cover a run.
        precision: Lightning precision: ``32-true``, ``bf16-mixed`` (refused on a CPU without bf16
            instructions), ``16-mixed`` (CUDA).
        accelerator: ``cpu``, ``gpu`` (refused without a visible CUDA device) or ``auto``.
        devices: devices per node (Lightning's ``devices``).
        num_nodes: machines (Lightning's ``num_nodes``).
        strategy: ``auto``, ``ddp`` (Lightning's data parallelism) or ``fsdp``: ``ddp`` with the frozen
            backbone's weights sharded across the processes (FSDP2), each holding 1/N of them; adapters, fusions
            and heads stay whole (:mod:`adafuse.continual.runtime.sharding`).
        num_workers: DataLoader worker processes.
        pad_to_multiple_of: pad each batch's length up to a multiple of N (null: to the batch's longest
            example), so that a few shapes cover a run; the attention mask hides the padding, so no metric
            changes. Generation tasks refuse it (their batches are laid out per architecture).
        limit_train_batches: train on at most this many batches (an int) or this share (a float) per epoch.
        early_stopping_patience: stop a task after this many validations without a better validation score.
        val_every_n_epochs: validate (and keep the best weights so far, and write the resume checkpoint) every N
            epochs; the best of those validated epochs is kept, so let ``max_epochs`` be a multiple of N.
        threads: torch CPU threads (default: torch's choice).
        progress_bar: Lightning's progress bar while training.
    """

    max_epochs: int = 2
    batch_size: int = 16
    accumulate_grad_batches: int = 1
    eval_batch_size: int = 64
    lr: float = 1e-3
    head_lr: float | None = None
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    gradient_clip_val: float | None = 1.0
    activation_checkpointing: bool = False
    compile: str = "off"
    precision: str = "32-true"
    accelerator: str = "cpu"
    devices: int | str = 1
    num_nodes: int = 1
    strategy: str = "auto"
    num_workers: int = 0
    pad_to_multiple_of: int | None = None
    limit_train_batches: int | float | None = None
    early_stopping_patience: int | None = None
    val_every_n_epochs: int = 1
    threads: int | None = None
    progress_bar: bool = True

    def __post_init__(self) -> None:
        at_least_one = (
            "max_epochs",
            "batch_size",
            "accumulate_grad_batches",
            "eval_batch_size",
            "num_nodes",
            "early_stopping_patience",
            "val_every_n_epochs",
            "threads",
            "pad_to_multiple_of",
        )
        for key in at_least_one:
            check_range(f"trainer.{key}", getattr(self, key), minimum=1)
        check_range("trainer.lr", self.lr, minimum=0, exclusive=True)
        check_range("trainer.head_lr", self.head_lr, minimum=0, exclusive=True)
        check_range("trainer.weight_decay", self.weight_decay, minimum=0)
        check_range("trainer.num_workers", self.num_workers, minimum=0)
        check_range("trainer.warmup_ratio", self.warmup_ratio, minimum=0, maximum=1)
        check_mode("trainer.compile", self.compile)
        if self.strategy not in TRAINER_STRATEGIES:
            raise UserError(f"trainer.strategy: '{self.strategy}' is not one of {', '.join(TRAINER_STRATEGIES)}")
        check_hardware(self.accelerator, self.precision)


@dataclass
class HeadConfig:
    """The head a task trains beside its adapter.

    Attributes:
        pooling: which hidden state a sequence-level head reads: ``auto`` (the architecture's own: first token
            on encoders, last non-padding token on decoders, mean on T5's encoder), ``cls``, ``last`` or
            ``mean``.
        dropout: dropout before the head's layers while training (in [0, 1)).
    """

    pooling: str = "auto"
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise UserError(f"head.pooling: '{self.pooling}' is not one of {', '.join(POOLINGS)}")
        check_range("head.dropout", self.dropout, minimum=0, maximum=1)


def check_range(key: str, value, minimum=None, maximum=None, exclusive: bool = False) -> None:
    """Refuse a number outside [minimum, maximum) (or (minimum, ...) with ``exclusive``); None passes."""
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return
    low = minimum is not None and (value <= minimum if exclusive else value < minimum)
    high = maximum is not None and value >= maximum
    if low or high or value != value:
        bounds = f"{'>' if exclusive else '>='} {minimum}" if maximum is None else f"in [{minimum}, {maximum})"
        raise UserError(f"{key}: {value} is out of range (expected {bounds})")


@dataclass
class MonitorConfig:
    """The forgetting monitor.

    Attributes:
        reference: also train a reference model on each task alone, for intransigence (a*_j − R[j][j]).
        every_n_val_epochs: while a task trains, also re-evaluate every earlier task every N validation epochs
            (recorded in metrics.json as ``interim``; 0: off).
    """

    reference: bool = False
    every_n_val_epochs: int = 0


PROXIES = ("leep", "probe")
DEFAULT_TOP_K = 5  # sources fused by --sources auto without --top-k, and shown as chosen by library rank


@dataclass
class RankingConfig:
    """Source ranking for ``sources: {auto: K}`` and ``adafuse library rank`` (the target's training split only).

    Attributes:
        proxy: ``leep`` (log expected empirical prediction, Nguyen et al. 2020) or ``probe`` (leave-one-out
            error of a ridge probe on the adapted features).
        max_length: tokens per example while ranking.
        batch_size: examples per forward pass.
        group: sources sharing one forward pass (through mixed-task routing).
        ridge: the probe's ridge penalty (> 0).
    """

    proxy: str = "leep"
    max_length: int = 64
    batch_size: int = 32
    group: int = 4
    ridge: float = 1.0

    def __post_init__(self) -> None:
        if self.proxy not in PROXIES:
            raise UserError(f"ranking.proxy: '{self.proxy}' is not one of {', '.join(PROXIES)}")
        for key in ("max_length", "batch_size", "group"):
            check_range(f"ranking.{key}", getattr(self, key), minimum=1)
        check_range("ranking.ridge", self.ridge, minimum=0, exclusive=True)


@dataclass
class RouterConfig:
    """How a class-incremental run of isolated adapters names each input's task.

    Attributes:
        kind: ``lda`` (streaming LDA on the bare backbone's features; statistics only, no example kept) or
            ``trained`` (a router adapter + head over every class so far, retrained after each task on the kept
            training examples of all tasks so far: it stores user data).
        epochs: the trained router's passes over the kept examples after each task.
        lr: the trained router's learning rate (default: ``trainer.lr``).
    """

    kind: str = "lda"
    epochs: int = 1
    lr: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in ROUTERS:
            raise UserError(f"router.kind: '{self.kind}' is not one of {', '.join(ROUTERS)}")
        check_range("router.epochs", self.epochs, minimum=1)
        check_range("router.lr", self.lr, minimum=0.0, exclusive=True)

    def learning_rate(self, trainer: TrainerConfig) -> float:
        """The rate the router trains at: its own ``lr``, else the trainer's."""
        return self.lr if self.lr is not None else trainer.lr


@dataclass
class JobConfig:
    """What every job has.

    Attributes:
        seed: seeds every initial state, data order and dropout.
        max_length: tokens per text (a task's own ``max_length`` may differ; both within the backbone's
            positions).
        backbone: the frozen transformer (:class:`BackboneConfig`).
        adapter: the adapter kind and shape (:class:`AdapterConfig`).
        head: the task heads (:class:`HeadConfig`).
        trainer: the training loop (:class:`TrainerConfig`).
    """

    seed: int = 0
    max_length: int = 128
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def __post_init__(self) -> None:
        check_range("max_length", self.max_length, minimum=2)


@dataclass
class RunConfig(JobConfig):
    """``adafuse run``: a task sequence.

    Attributes:
        sequence: a built-in sequence (``bbc-topics``, ``bbc-class-incremental``, ``mixed-types``); null when
            ``tasks`` is given.
        tasks: the tasks in order: built-in names or task specs (:class:`TaskSpec`).
        method: ``adapters`` (isolated, one per task), ``shared-adapter``, ``full-finetune`` (the forgetting
            baselines), ``ewc``, ``lwf`` or ``replay`` (strategies on ``strategy.base``).
        setting: ``task-incremental`` (the task is given at test time) or ``class-incremental`` (it is not:
            disjoint label sets, inputs classified among every class seen so far).
        strategy: the strategies' settings (:class:`StrategyConfig`).
        monitor: the forgetting monitor (:class:`MonitorConfig`).
        router: class-incremental task identification (:class:`RouterConfig`).
    """

    sequence: str | None = "bbc-topics"
    tasks: list[TaskSpec | str] | None = None
    method: str = "adapters"
    setting: str = "task-incremental"
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    router: RouterConfig = field(default_factory=RouterConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method not in METHODS:
            raise UserError(f"method: '{self.method}' is not one of {', '.join(METHODS)}")
        if self.setting not in SETTINGS:
            raise UserError(f"setting: '{self.setting}' is not one of {', '.join(SETTINGS)}")
        if self.router.kind != "lda" and (self.setting != "class-incremental" or self.method != "adapters"):
            raise UserError(
                f"router.kind: '{self.router.kind}' routes isolated adapters (method: adapters) in setting "
                f"class-incremental; this run is method {self.method}, setting {self.setting}"
            )
        if self.method in STRATEGY_METHODS and (self.trainer.devices not in (1, "1") or self.trainer.num_nodes > 1):
            raise UserError(f"method: '{self.method}' trains on one device (trainer.devices: 1, trainer.num_nodes: 1)")

    @property
    def base_method(self) -> str:
        """The method whose trainable set runs: ``strategy.base`` under a strategy, else ``method`` itself."""
        return self.strategy.base if self.method in STRATEGY_METHODS else self.method


@dataclass
class FuseConfig(JobConfig):
    """``adafuse fuse``: AdapterFusion over library adapters for a target task.

    Attributes:
        target: the target task: a built-in name or a task spec (:class:`TaskSpec`).
        sources: ``all`` (every adapter the composition can take), a list of adapter names, or ``{auto: K}``
            (the best K by ranking, see ``ranking``).
        name: the fusion's name in the library (default: ``<target>-fusion``).
        shots: training examples per class of the target (default: all, or the built-in task's own).
        fusion: the fusion layer (:class:`FusionConfig`).
        ranking: source ranking for ``sources: {auto: K}`` (:class:`RankingConfig`).
        check_sources: re-evaluate built-in source tasks before and after (their scores must not move).
    """

    target: TaskSpec | str = "bbc-topic5-fewshot"
    sources: list[str] | str | dict[str, int] = "all"
    name: str | None = None
    shots: int | None = None
    fusion: FusionConfig = field(default_factory=FusionConfig)
    ranking: RankingConfig = field(default_factory=RankingConfig)
    check_sources: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.sources, dict) and (
            list(self.sources) != ["auto"] or isinstance(self.sources["auto"], bool) or self.sources["auto"] < 1
        ):
            raise UserError(
                f"sources: expected 'all', a list of adapter names or {{auto: K}} (K >= 1), found {self.sources}"
            )
        check_range("shots", self.shots, minimum=1)
        check_range("fusion.dropout", self.fusion.dropout, minimum=0, maximum=1)
        check_range("fusion.reg_lambda", self.fusion.reg_lambda, minimum=0)
        check_range("fusion.temperature_start", self.fusion.temperature_start, minimum=1)


# ---- loading ------------------------------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _convert(value, option, where)
            except UserError as err:
                errors.append(err)
        raise UserError(f"{where}: {value!r} is not a {' or '.join(_type_name(o) for o in options)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping of {tp.__name__} keys, found {value!r}")
        return build(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"{where}: expected a list, found {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, found {value!r}")
        key_tp, value_tp = typing.get_args(tp)
        return {_convert(k, key_tp, where): _convert(v, value_tp, f"{where}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool):
        if type(value) is not tp:
            raise UserError(f"{where}: {value!r} is not a {tp.__name__}")
        return value
    raise UserError(f"{where}: unsupported type {tp}")


def build(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, refusing unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    prefix = f"{where}." if where else ""
    if unknown:
        raise UserError(f"unknown key '{prefix}{unknown[0]}'; expected one of {', '.join(sorted(names))}")
    kwargs = {key: _convert(value, hints[key], f"{prefix}{key}") for key, value in data.items()}
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.init
        and f.name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise UserError(f"missing key '{prefix}{missing[0]}'")
    try:
        return cls(**kwargs)
    except UserError as err:
        prefix = f"{where}: " if where and not str(err).startswith(where) else ""
        raise UserError(f"{prefix}{err}") from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise UserError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read ({err})") from None
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({first_line(err)})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping at the top level, found {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--a.b value`` pairs (or ``--a.b=value``) onto nested ``data``."""
    items = list(overrides)
    while items:
        flag = items.pop(0)
        if not flag.startswith("--") or len(flag) < 3:
            raise UserError(f"unexpected argument '{flag}'; overrides look like --trainer.max_epochs 1")
        key, eq, raw = flag[2:].partition("=")
        if not eq:
            if not items:
                raise UserError(f"override '{flag}' has no value")
            raw = items.pop(0)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override '--{key}': '{part}' is not a section")
        node[parts[-1]] = value
    return data


def load_config(cls: type, path: str | Path | None, overrides: list[str] = ()) -> Any:
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, list(overrides))
    try:
        return build(cls, data)
    except UserError as err:
        raise UserError(f"{path}: {err}" if path else str(err)) from None


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def dump_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)

"""The pre-training configuration: one typed dataclass holding every default, YAML + overrides in,
the resolved YAML out (``config.yaml`` in the run directory)."""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from sept.errors import SeptError, first_line
from sept.io import atomic_write_text
from sept.training.encoder import ARCHS
from sept.training.methods import check_method

CONFIG_FILENAME = "config.yaml"


@dataclass
class PretrainConfig:
    """A self-supervised pre-training run. ``batch_size`` is per rank."""

    data: str = field(
        default="",
        metadata={
            "required": True,
            "help": "training shards: brace pattern, directory or listing file; or a task of a selection "
            "(SEL/tasks/TASK), or a selection folder with --task: only the task's samples of the shared shards "
            "are read",
        },
    )
    """Shard spec of the training data (see ``sept.data.shards.list_shards``), or one task's folder
    (or manifest) in a selection, ``SEL/tasks/TASK``: then only that task's samples of the shared
    shards are read (``sept.data.task_subset``)."""
    out: str = field(
        default="runs/pretrain", metadata={"required": True, "help": "run directory (checkpoints, logs, encoder.pt)"}
    )
    """Run directory: config.yaml, checkpoint.pt, metrics.csv, rank_metrics.csv, summary.json,
    encoder.pt (see ``sept.training.trainer``)."""
    method: str = field(
        default="simclr",
        metadata={
            # METHODS and their aliases (tests/test_config_cli.py checks they agree)
            "choices": ("simclr", "moco", "byol", "detcon", "detcon_s", "detcon_b"),
            "help": "SSL method; detcon = detcon_s (masks are computed into the run directory if the data has none)",
        },
    )
    """simclr | moco | byol | detcon_s | detcon_b (``detcon`` is read as detcon_s)."""
    arch: str = "resnet18_small"
    """resnet18_small | resnet18 | resnet34 | resnet50."""
    width: int | None = None
    """Base width of resnet18_small (None: ``encoder.SMALL_RESNET_WIDTH``); not for other archs."""
    image_size: int = 32
    batch_size: int = field(default=64, metadata={"help": "batch size per rank"})
    steps: int = field(default=1000, metadata={"help": "total optimizer steps"})
    lr: float = field(default=0.05, metadata={"help": "peak learning rate"})
    lr_reference_batch: int | None = field(
        default=None,
        metadata={
            "help": "when set, --lr is the rate for a global batch of this many samples and is scaled "
            "linearly to the run's global batch (batch size x ranks), the rule of Goyal et al. 2017; "
            "default: --lr is used as given"
        },
    )
    warmup_steps: int = 0
    """Linear warm-up steps (of the run; of every cycle under the cyclic schedule)."""
    weight_decay: float = 1e-4
    optimizer: str = "sgd"
    """sgd (momentum 0.9) | adamw | lars (SGD momentum 0.9 with LARS trust ratios, as SimCLR/BYOL)."""
    temperature: float = 0.2
    """Softmax temperature of SimCLR and MoCo."""
    momentum: float = 0.99
    """EMA momentum of MoCo's key encoder / BYOL's and DetCon-B's target (BYOL: the base of its cosine schedule)."""
    color_jitter: float = 0.5
    """Colour-jitter strength s of the augmentations (0 disables jitter)."""
    crop_min_scale: float = 0.2
    """Smallest area share of the image a random-resized crop keeps (1 keeps the whole image)."""
    lr_schedule: str = "cosine"
    """cosine (warm-up, then cosine decay over ``steps``) | cyclic (the extendable cyclic schedule
    of arXiv 2212.05611, see ``sept.training.acceleration``)."""
    cycle_steps: int | None = None
    """Steps per cycle of the cyclic schedule (None: a third of ``steps``, fixed when the config is
    loaded; set it explicitly to extend a run by more cycles)."""
    cycle_decay: float = 1.0
    """Peak learning rate of cycle c is ``lr * cycle_decay**c``."""
    min_lr_ratio: float = 0.0
    """Learning rate at the end of each cycle, as a fraction of the cycle's peak."""
    progressive: bool = False
    """Progressive image resolution and augmentation magnitude within each cycle (arXiv 2212.05611)."""
    min_image_size: int | None = None
    """Image side of the first progressive stage (None: three quarters of ``image_size``, at least 8)."""
    min_strength: float = 0.5
    """Augmentation magnitude of the first progressive stage (the last is 1)."""
    progressive_stages: int = 4
    """Stages per cycle of the progressive schedules."""
    hard_positives: bool = False
    """Hard positive mining by augmentation difficulty (arXiv 2212.05611)."""
    positive_candidates: int = 2
    """Candidate crop pairs per image of which hard positive mining keeps the hardest."""
    num_masks: int = 16
    """DetCon: segments pooled per image."""
    detcon_temperature: float = 0.1
    """DetCon: softmax temperature of the mask-level contrastive loss."""
    device: str = "auto"
    """auto (this rank's GPU from SLURM_LOCALID/LOCAL_RANK if CUDA is present, else CPU) | cpu |
    cuda (an error when this rank's GPU is not visible)."""
    precision: str = "auto"
    """auto (bfloat16 autocast on GPUs, float32 on CPUs: see ``trainer.uses_bf16``) | bf16 | fp32."""
    compile: bool = False
    """torch.compile the model (GPU only)."""
    seed: int = 0
    num_workers: int | None = field(
        default=None,
        metadata={
            "help": "data-loading worker processes per rank (0: load in the training process; default: one "
            "fewer than the CPUs each rank is given by --cpus-per-task, so a GPU is not starved)"
        },
    )
    cache_mb: int = 1024
    """Per rank, the training data (tar bytes and decoded images) kept in memory up to this many MB,
    so a small training set is read and decoded once, not every epoch (0: off). Only the
    in-process loader has one (``num_workers=0``)."""
    run_ahead: int = 0
    """With ``num_workers=0``: batches made ahead by one loading process that lasts the whole run
    (the same batches the training process would make), so loading runs beside the model's step
    on another core and the model keeps the rest (0: load in the training process, in turn)."""
    checkpoint_every: int = 100
    log_every: int = 10
    sample_log: bool = False
    """Write ``samples-rank{r}.csv`` (step, sample ids of the batch) to audit data order."""
    max_samples: int | None = None
    """Use at most this many samples of the data per epoch (None: all)."""
    num_samples: int | None = None
    """Number of samples in ``data`` if known and ``data`` is one shard (skips the header count
    of the tar); multi-shard data is always counted, per shard, from tar headers."""


_OPTIMIZERS = ("sgd", "adamw", "lars")
_LR_SCHEDULES = ("cosine", "cyclic")
_DEVICES = ("auto", "cpu", "cuda")
_METHOD_ALIASES = {"detcon": "detcon_s"}

PRESETS: dict[str, dict[str, Any]] = {
    "fast": {
        "lr_schedule": "cyclic",
        "progressive": True,
        "hard_positives": True,
    },
}
"""Named sets of config values, applied above the defaults and below a YAML file and overrides.
``fast``: every acceleration strategy of arXiv 2212.05611 (``sept.training.acceleration``). On
CPU-sized runs it is cheaper per step but ends below plain SimCLR; it is meant for long GPU runs,
where the paper measured it (benchmarks/RESULTS.md, "Time to accuracy")."""


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(PretrainConfig)


def _coerce(key: str, value: Any, annotation: Any, source: str) -> Any:
    """``value`` as the field's type; strings from a command line are parsed, None kept where allowed."""
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    if value is None:
        if type(None) in options:
            return None
        raise SeptError(f"config key {key!r} in {source} may not be empty")
    for kind in options:
        if kind is type(None):
            continue
        if kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            continue
        if isinstance(value, bool):
            continue  # YAML `yes` must not become 1 or 1.0
        if kind is int:
            if isinstance(value, int):
                return value
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if isinstance(value, str):
                try:
                    return int(value)
                except ValueError:
                    continue
        elif kind is float:
            if isinstance(value, (int, float)):
                return float(value)
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    continue
        elif kind is str:
            if isinstance(value, (str, os.PathLike)):
                return os.fspath(value)
    names = " or ".join("null" if k is type(None) else k.__name__ for k in options)
    raise SeptError(f"config key {key!r} in {source} must be {names}, got {value!r}")


def _validate(cfg: PretrainConfig, source: str) -> None:
    positive = ("image_size", "batch_size", "steps", "checkpoint_every", "log_every")
    for key in positive:
        if getattr(cfg, key) < 1:
            raise SeptError(f"config key {key!r} in {source} must be at least 1, got {getattr(cfg, key)}")
    for key in ("warmup_steps", "num_workers", "seed", "cache_mb", "run_ahead"):
        if getattr(cfg, key) is not None and getattr(cfg, key) < 0:
            raise SeptError(f"config key {key!r} in {source} must be non-negative, got {getattr(cfg, key)}")
    for key in ("max_samples", "num_samples", "width", "lr_reference_batch"):
        if getattr(cfg, key) is not None and getattr(cfg, key) < 1:
            raise SeptError(f"config key {key!r} in {source} must be at least 1, got {getattr(cfg, key)}")
    check_method(cfg.method)
    if cfg.precision not in ("auto", "bf16", "fp32"):
        raise SeptError(f"config key 'precision' in {source} must be auto, bf16 or fp32, got {cfg.precision!r}")
    if cfg.arch not in ARCHS:
        raise SeptError(f"config key 'arch' in {source} must be one of {', '.join(ARCHS)}, got {cfg.arch!r}")
    if cfg.width is not None and cfg.arch != "resnet18_small":
        raise SeptError(f"config key 'width' in {source} applies to resnet18_small only, not {cfg.arch}")
    if cfg.optimizer not in _OPTIMIZERS:
        raise SeptError(
            f"config key 'optimizer' in {source} must be one of {', '.join(_OPTIMIZERS)}, got {cfg.optimizer!r}"
        )
    if cfg.lr <= 0 or cfg.temperature <= 0 or cfg.weight_decay < 0:
        raise SeptError(f"config in {source}: lr and temperature must be positive, weight_decay non-negative")
    if not 0.0 < cfg.crop_min_scale <= 1.0:
        raise SeptError(f"config key 'crop_min_scale' in {source} must lie in (0, 1], got {cfg.crop_min_scale}")
    if not 0.0 <= cfg.momentum < 1.0:
        raise SeptError(f"config key 'momentum' in {source} must lie in [0, 1), got {cfg.momentum}")
    for key, allowed in (("lr_schedule", _LR_SCHEDULES), ("device", _DEVICES)):
        if getattr(cfg, key) not in allowed:
            raise SeptError(
                f"config key {key!r} in {source} must be one of {', '.join(allowed)}, got {getattr(cfg, key)!r}"
            )
    for key in ("cycle_steps", "min_image_size", "progressive_stages", "positive_candidates", "num_masks"):
        if getattr(cfg, key) is not None and getattr(cfg, key) < 1:
            raise SeptError(f"config key {key!r} in {source} must be at least 1, got {getattr(cfg, key)}")
    if cfg.cycle_decay <= 0 or not 0.0 <= cfg.min_lr_ratio < 1.0 or not 0.0 < cfg.min_strength <= 1.0:
        raise SeptError(
            f"config in {source}: cycle_decay must be positive, min_lr_ratio in [0, 1), min_strength in (0, 1]"
        )
    if cfg.min_image_size is not None and cfg.min_image_size > cfg.image_size:
        raise SeptError(
            f"config key 'min_image_size' in {source} exceeds image_size ({cfg.min_image_size} > {cfg.image_size})"
        )
    if cfg.detcon_temperature <= 0:
        raise SeptError(f"config key 'detcon_temperature' in {source} must be positive")


def load_config(
    yaml_path: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    base: Mapping[str, Any] | None = None,
    preset: str | None = None,
) -> PretrainConfig:
    """Defaults, then ``base`` (a caller's own defaults, e.g. bootstrap's step count), then the
    named ``preset`` (``PRESETS``), then the YAML file's keys, then ``overrides`` (None values
    mean "not given", so unset command-line options can be passed through). Unknown keys and
    wrongly typed values raise ``SeptError`` naming the key and where it came from. Derived
    values (``cycle_steps``, ``min_image_size``, the method alias) are filled in once here, so
    the saved config says exactly what ran."""
    types_by_key = _field_types()
    values: dict[str, Any] = {}
    sources: list[tuple[str, Mapping[str, Any]]] = []
    if base:
        sources.append(("defaults", base))
    if preset is not None:
        if preset not in PRESETS:
            raise SeptError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
        sources.append((f"preset {preset}", PRESETS[preset]))
    if yaml_path is not None:
        yaml_path = os.fspath(yaml_path)
        try:
            with open(yaml_path, encoding="utf-8") as f:
                loaded = yaml.safe_load(f)
        except FileNotFoundError:
            raise SeptError(f"config file not found: {yaml_path}") from None
        except (OSError, yaml.YAMLError) as err:
            reason = first_line(err)
            raise SeptError(f"cannot read config file {yaml_path}: {reason}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, Mapping):
            raise SeptError(f"config file {yaml_path} must hold a mapping of keys, not {type(loaded).__name__}")
        sources.append((yaml_path, loaded))
    if overrides:
        sources.append(("overrides", {k: v for k, v in overrides.items() if v is not None}))
    for source, mapping in sources:
        for key, value in mapping.items():
            if key not in types_by_key:
                raise SeptError(f"unknown config key {key!r} in {source} (known: {', '.join(types_by_key)})")
            values[key] = _coerce(key, value, types_by_key[key], source)
    cfg = PretrainConfig(**values)
    source = " + ".join(s for s, _ in sources) or "defaults"
    cfg = _resolve(cfg)
    _validate(cfg, source)
    return cfg


def _resolve(cfg: PretrainConfig) -> PretrainConfig:
    """Fills the derived values (see ``load_config``)."""
    changes: dict[str, Any] = {}
    if cfg.method in _METHOD_ALIASES:
        changes["method"] = _METHOD_ALIASES[cfg.method]
    if cfg.lr_schedule == "cyclic" and cfg.cycle_steps is None:
        changes["cycle_steps"] = max(1, cfg.steps // 3)
    if cfg.progressive and cfg.min_image_size is None:
        changes["min_image_size"] = min(cfg.image_size, max(8, cfg.image_size * 3 // 4))
    return dataclasses.replace(cfg, **changes) if changes else cfg


def config_to_dict(cfg: PretrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_resolved_config(cfg: PretrainConfig, run_dir: str | os.PathLike) -> str:
    """Writes every field of ``cfg`` to ``run_dir/config.yaml`` atomically; returns its path.
    ``load_config`` of that file gives back an equal config."""
    run_dir = os.fspath(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    return atomic_write_text(os.path.join(run_dir, CONFIG_FILENAME), text)

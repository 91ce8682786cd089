"""Typed configuration: one frozen dataclass per table of ``pipeline.toml``.

The dataclass defaults below are *the* defaults; ``pipeline.toml`` restates every
one of them with a comment (``tests/test_config.py`` checks the two agree), so a
user can read the file to learn every knob and edit it without reading code.

Layers are laid over the defaults by ``load_config``. Unknown tables/keys and
wrong types fail with a message that names the key; nothing is silently ignored.
"""
from __future__ import annotations

import dataclasses
import json
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import ConfigError  # noqa: F401  (defined with the other errors; callers import it from here too)

# The default config ships inside the package: in the checkout common/pipeline.toml is a
# symlink to the top-level pipeline.toml (one file to edit), and the wheel stores a copy of it,
# so an installed `pipeline` finds its defaults without the checkout (docs/design-notes.md).
DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent / "pipeline.toml"


# Each choice list is written once, here: the checks in _validate_table, the CLI's click.Choice
# and common/loader_kind.py read these.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
LOADERS = ("auto", "dali", "torch")
SCHEDULES = ("step", "cosine")
LOG_SINKS = ("jsonl", "tensorboard")
DISC_LR_MODES = ("own", "as_released")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")  # preprocess.interpolation may also be "": the model's own


@dataclass(frozen=True)
class RuntimeConfig:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    channels_last: bool = True  # applied on CUDA only
    compile: bool = False  # torch.compile the student
    seed: int = 0
    num_workers: int = 2  # decode workers (torch loader) / DALI threads
    torch_threads: int = 0  # torch intra-op threads per process; 0 = the cores minus num_workers (>= 1)
    progress: bool = True  # progress bars on long work


@dataclass(frozen=True)
class DataConfig:
    manifest: str = ""  # training manifest (Parquet from `pipeline manifest build`)
    val_manifest: str = ""  # validation manifest
    data_root: str = ""  # overrides the image root recorded in the manifests


@dataclass(frozen=True)
class CropConfig:
    num_crops: int = 8  # C: crops cached per image
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (0.75, 4.0 / 3.0)
    flip_p: float = 0.5
    seed: int = 0


@dataclass(frozen=True)
class TeacherCacheConfig:
    teachers: tuple[str, ...] = ("senet154", "resnest269")
    teacher_weights: tuple[str, ...] = ()  # "NAME=PATH" (safetensors or state dict)
    input_sizes: tuple[str, ...] = ()  # "NAME=SIZE" overrides of a teacher's input size
    pretrained: bool = True  # timm hub weights for teachers without a weights file
    out: str = ""  # cache directory
    topk: int = 10
    temperature: float = 1.0
    batch_size: int = 64  # crops per teacher forward pass
    images_per_shard: int = 1024
    loader: str = "auto"  # auto (DALI on CUDA when importable, else torch; common/loader_kind.py) | dali | torch
    evaluate_manifest: str = ""  # measure teachers on this manifest before caching
    min_top1_over_chance: float = 2.0  # stop if a teacher's top-1 < this x chance


@dataclass(frozen=True)
class OptimConfig:
    epochs: int = 180
    batch_size: int = 256
    eval_batch_size: int = 256
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "step"  # step | cosine
    lr_decay_epochs: tuple[int, ...] = (80, 160)  # step schedule milestones
    lr_decay_factor: float = 0.1
    warmup_epochs: int = 0
    loader: str = "auto"  # as teacher_cache.loader: auto (DALI on CUDA when importable, else torch) | dali | torch
    img_size: int = 0  # 0: the model's own default input size
    log_every: int = 50  # steps between loss logs
    log: str = "jsonl"  # jsonl (RUN/metrics.jsonl) | tensorboard (metrics.jsonl + TensorBoard events in RUN/)
    eval_every: int = 1  # epochs between validations (the last epoch is always validated)


@dataclass(frozen=True)
class DistillConfig:
    student: str = "resnet50"
    student_weights: str = ""  # local checkpoint/safetensors to start from
    pretrained: bool = False  # timm hub weights for the student
    cache: str = ""
    out: str = ""
    discriminator: bool = True
    disc_lr: float = 1e-4
    disc_lr_mode: str = "own"  # own: disc_lr, scaled by the schedule | as_released: the student's lr (original code)
    crops_per_image: int = 1  # m crops per decoded image (FKD multi-crop)
    cutmix_prob: float = 0.0
    cutmix_alpha: float = 1.0
    label_weight: float = 0.0  # w: loss = KL + w * CE to the hard label (+ d_loss); 0 = MEAL V2 (no hard labels)
    hard_label_top1: float = 0.0  # a short hard-label run's top-1 (E/4 epochs), for the will-it-pay check; 0 = none
    resume: bool = False
    online: bool = False  # teachers in the loop ([teacher_cache] teachers) instead of a cache
    replay_cache: str = ""  # with online: replay this cache's boxes and flips instead of fresh crops
    check_images: bool = False  # digest every image file against the manifests before training


@dataclass(frozen=True)
class PreprocessConfig:
    """The student's pixels where its timm pretrained config is not what a recipe was evaluated with."""

    interpolation: str = ""  # "" = the model's own | bilinear | bicubic | nearest
    crop_pct: float = 0.0  # evaluation centre crop / shorter side; 0 = the model's own
    mean: tuple[float, ...] = ()  # () = the model's own; else 3 values
    std: tuple[float, ...] = ()


@dataclass(frozen=True)
class TrainConfig:
    model: str = "resnet50"
    weights: str = ""
    pretrained: bool = False
    out: str = ""
    label_smoothing: float = 0.0
    resume: bool = False


@dataclass(frozen=True)
class DemoConfig:
    out: str = "runs/demo"
    data_dir: str = "data/fashion-mnist"
    source_dir: str = "/usr/share/datasets/fashion-mnist"
    train_images: int = 1000  # the students' class-balanced subset of the 60,000 training images
    val_images: int = 10000  # the test images scored (all 10,000: +-0.4 points of sampling noise)
    teacher_train_images: int = 60000  # the teachers' training images (0: the students' subset)
    teachers: tuple[str, ...] = ("test_resnet", "test_byobnet")
    teacher_epochs: int = 2  # on teacher_train_images
    student: str = "test_efficientnet"
    student_epochs: int = 60
    # its training settings ([optim], [crops], [teacher_cache]) are stage2_student_distill/app/demo.toml, laid over the file


@dataclass(frozen=True)
class Config:
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    data: DataConfig = field(default_factory=DataConfig)
    crops: CropConfig = field(default_factory=CropConfig)
    teacher_cache: TeacherCacheConfig = field(default_factory=TeacherCacheConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)

    def replace(self, **overrides: Any) -> "Config":
        """``cfg.replace(**{"optim.epochs": 3})`` -> a new validated Config."""
        return apply_overrides(self, overrides)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the resolved config (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


_TABLE_TYPES = typing.get_type_hints(Config)


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against ``annotation`` and normalise it (lists -> tuples)."""
    origin = typing.get_origin(annotation)
    if annotation in (bool, int, str):
        if isinstance(value, annotation) and (annotation is bool or not isinstance(value, bool)):  # True is an int
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif origin is tuple:
        args = typing.get_args(annotation)
        if isinstance(value, str):
            # from a command line: "[0.5, 1.0]" (TOML) or "a,b,c"
            parsed = _parse_scalar(value) if value.lstrip().startswith("[") else None
            if isinstance(parsed, list):
                value = parsed
            else:
                value = [v for v in (s.strip() for s in value.split(",")) if v]
                if args[0] is not str:
                    value = [_parse_scalar(v) for v in value]
        if isinstance(value, (list, tuple)):
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
            if len(value) == len(args):
                return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    else:  # pragma: no cover - only reached if a new field type is added
        raise TypeError(f"config field {key}: unsupported annotation {annotation!r}")
    expected = "a list " + str(annotation).replace("tuple", "") if origin is tuple else annotation.__name__
    raise ConfigError(f"config key '{key}': expected {expected}, got {value!r} ({type(value).__name__})")


def _parse_scalar(text: str) -> Any:
    """Parse a command-line value the way TOML would; fall back to the raw string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _build_table(table: str, values: dict[str, Any], base: Any, source: str) -> Any:
    hints = typing.get_type_hints(type(base))  # every field of a table, by name
    updates = {}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(
                f"{source}: unknown key '{table}.{key}'. Known keys in [{table}]: {', '.join(sorted(hints))}"
            )
        updates[key] = _coerce(value, hints[key], f"{table}.{key}")
    table_cfg = dataclasses.replace(base, **updates)
    _validate_table(table, table_cfg)
    return table_cfg


# Seeds feed 64-bit hashes (common.crops) and torch.manual_seed; TOML integers are signed
# 64-bit, so this is the range a config file can hold and every consumer accepts.
SEED_RANGE = (0, 2**63 - 1)


def _validate_table(table: str, t: Any) -> None:
    """Every range check of every key, in one place; a message names the key and the rule."""

    def need(cond: bool, key: str, what: str) -> None:
        if not cond:
            raise ConfigError(f"config key '{table}.{key}' = {getattr(t, key)!r}: {what}")

    def seed(key: str) -> None:
        lo, hi = SEED_RANGE
        need(lo <= getattr(t, key) <= hi, key, f"must be in {lo}..2**63-1 (a 64-bit seed)")

    def at_least(minimum: int, *keys: str) -> None:
        for key in keys:
            need(getattr(t, key) >= minimum, key, f"must be >= {minimum}")

    def probability(*keys: str) -> None:
        for key in keys:
            need(0 <= getattr(t, key) <= 1, key, "must be in [0, 1]")

    def positive(*keys: str) -> None:
        for key in keys:
            need(getattr(t, key) > 0, key, "must be > 0")

    def one_of(key: str, choices: tuple[str, ...]) -> None:
        need(getattr(t, key) in choices, key, f"use one of {', '.join(choices)}")

    def area_range(key: str) -> None:
        lo, hi = getattr(t, key)
        need(0 < lo <= hi <= 1, key, "need 0 < min <= max <= 1")

    if table == "runtime":
        one_of("precision", PRECISIONS)
        # exactly the forms build_runtime handles; any other ("cuda_evil", "meta") would end in a traceback
        need(re.fullmatch(r"auto|cpu|cuda(:\d+)?", t.device) is not None, "device", "use auto, cpu, cuda or cuda:N (N = 0, 1, ...)")
        seed("seed")
        at_least(0, "num_workers")
        need(t.torch_threads >= 0, "torch_threads", "must be >= 0 (0 = torch's default)")
    elif table == "crops":
        at_least(1, "num_crops")
        area_range("scale")
        need(0 < t.ratio[0] <= t.ratio[1], "ratio", "need 0 < min <= max")
        probability("flip_p")
        seed("seed")
    elif table == "teacher_cache":
        at_least(1, "topk", "batch_size", "images_per_shard")
        positive("temperature")
        need(t.min_top1_over_chance >= 0, "min_top1_over_chance", "must be >= 0 (0 = no check)")
        one_of("loader", LOADERS)
        for key in ("teacher_weights", "input_sizes"):
            for item in getattr(t, key):
                need("=" in item, key, f"entry {item!r} must look like NAME=VALUE")
    elif table == "optim":
        at_least(1, "epochs", "batch_size", "eval_batch_size", "log_every")
        positive("lr", "lr_decay_factor")
        need(0 <= t.momentum < 1, "momentum", "must be in [0, 1)")
        need(t.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(all(m >= 1 for m in t.lr_decay_epochs), "lr_decay_epochs", "milestones are epochs >= 1")
        at_least(0, "warmup_epochs")
        one_of("schedule", SCHEDULES)
        one_of("loader", LOADERS)
        need(t.img_size >= 0, "img_size", "must be >= 0 (0 = model default)")
        need(t.eval_every >= 1, "eval_every", "must be >= 1 (the last epoch is always validated)")
        one_of("log", LOG_SINKS)
    elif table == "distill":
        positive("disc_lr", "cutmix_alpha")
        at_least(1, "crops_per_image")
        probability("cutmix_prob")
        need(t.label_weight >= 0, "label_weight", "must be >= 0 (0 = MEAL V2: no hard labels)")
        need(0 <= t.hard_label_top1 <= 100, "hard_label_top1", "must be a top-1 in percent, 0-100 (0 = not measured)")
        one_of("disc_lr_mode", DISC_LR_MODES)
    elif table == "train":
        need(0 <= t.label_smoothing < 1, "label_smoothing", "must be in [0, 1)")
    elif table == "demo":
        at_least(1, "train_images", "val_images", "teacher_epochs", "student_epochs")
        at_least(0, "teacher_train_images")
    elif table == "preprocess":
        need(t.interpolation in ("", *INTERPOLATIONS), "interpolation",
             f"use {', '.join(INTERPOLATIONS)} or \"\" (the model's own)")
        need(0 <= t.crop_pct <= 1, "crop_pct", "must be in (0, 1], or 0 for the model's own")
        for key in ("mean", "std"):
            need(len(getattr(t, key)) in (0, 3), key, "give 3 values (R, G, B) or [] for the model's own")
        need(all(v > 0 for v in t.std), "std", "values must be > 0")


def apply_overrides(cfg: Config, overrides: dict[str, Any], source: str = "override") -> Config:
    """Apply ``{"table.key": value}`` overrides; string values are parsed as TOML literals."""
    grouped: dict[str, dict[str, Any]] = {}
    for dotted, value in overrides.items():
        if value is None:
            continue
        table, _, key = dotted.partition(".")
        if table not in _TABLE_TYPES or not key:
            raise ConfigError(
                f"{source}: '{dotted}' is not a config key; use TABLE.KEY with TABLE one of {', '.join(_TABLE_TYPES)}"
            )
        hint = typing.get_type_hints(_TABLE_TYPES[table]).get(key)
        if isinstance(value, str) and hint not in (str, None) and typing.get_origin(hint) is not tuple:
            value = _parse_scalar(value)  # a tuple's string is split by _coerce, an unknown key refused there
        grouped.setdefault(table, {})[key] = value
    updates = {t: _build_table(t, vals, getattr(cfg, t), source) for t, vals in grouped.items()}
    return dataclasses.replace(cfg, **updates)


def load_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None, recipe: str | None = None,
    layers: tuple[Path, ...] = (),
) -> Config:
    """Defaults <- TOML file (``path``, default: the packaged pipeline.toml) <- layers <- recipe <- overrides.

    ``layers`` are a command's own partial config files (stage2_student_distill/app/demo.toml); ``recipe`` is a name from
    ``recipes/`` or a path to a partial config file (common/recipes.py); both are laid over the file,
    and overrides still win.
    """
    cfg = Config()
    path = Path(path) if path else DEFAULT_CONFIG_PATH
    if path.exists():
        cfg = apply_overrides(cfg, read_config_file(path), source=str(path))
    elif path != DEFAULT_CONFIG_PATH:
        raise ConfigError(f"config file {path} does not exist; pass an existing --config or omit it")
    for layer in layers:
        cfg = apply_overrides(cfg, read_config_file(layer), source=str(layer))
    if recipe:
        from common.recipes import recipe_path  # recipes build on this module

        recipe_file = recipe_path(recipe)
        cfg = apply_overrides(cfg, read_config_file(recipe_file), source=f"recipe {recipe_file}")
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    return cfg


def read_config_file(path: Path) -> dict[str, Any]:
    """A TOML config (whole or partial) as flat ``{"table.key": value}``; unknown tables fail by name."""
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e}); fix the syntax at the position given") from None
    flat: dict[str, Any] = {}
    for table, values in data.items():
        if table not in _TABLE_TYPES or not isinstance(values, dict):
            raise ConfigError(f"{path}: unknown table [{table}]; known tables: {', '.join(_TABLE_TYPES)}")
        flat.update({f"{table}.{key}": value for key, value in values.items()})
    return flat


def config_to_toml(cfg: Config) -> str:
    """The whole resolved config as TOML; ``load_config`` of it gives ``cfg`` back."""
    lines = []
    for table, values in cfg.to_dict().items():
        lines.append(f"[{table}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # repr round-trips floats (and inf/nan are TOML too)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string: JSON's escapes are TOML's
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")  # pragma: no cover - config values are the types above


def parse_assignments(items: tuple[str, ...] | list[str], key: str) -> dict[str, str]:
    """``("a=x", "b=y")`` -> ``{"a": "x", "b": "y"}``; used for NAME=VALUE lists."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ConfigError(f"config key '{key}': entry {item!r} must look like NAME=VALUE")
        out[name.strip()] = value.strip()
    return out

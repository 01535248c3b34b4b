"""Typed sweep configuration: frozen dataclasses loaded from YAML (or a dict).

Every field is checked once, here; an unknown or invalid field raises
``ConfigError("section.field", message)`` naming the field and what is expected.

Example::

    cfg = load_config("jobs/configs/demo.yaml")
    cfg.grid.backbones        # ('efficientnet_lite0', ...)
    dump_config(cfg, exp_dir / "config.yaml")
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from raycyto.device import PRECISIONS
from raycyto.errors import ConfigError

#: Metrics a trial reports per split; ``val_<m>`` selects epochs and drives the search.
METRICS = ("loss", "accuracy", "precision", "recall", "f1", "auc")
#: Fine-tuning modes; ``raycyto.models.finetune`` implements exactly these (tests/test_hygiene.py checks).
FINETUNE_MODES = ("frozen", "last1", "last2", "full")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine")
#: ``search.algorithm`` names; ``raycyto.tune.search.SEARCHERS`` implements exactly these.
SEARCH_ALGORITHMS = ("optuna", "hyperopt", "bayesopt", "random")
LOSSES = ("cross_entropy",)
#: ``mc.refer_rule`` names; ``raycyto.referral.policy.ReferralPolicy`` applies exactly these.
REFER_RULES = ("vote", "set", "risk")
#: ``mc.conformal_score`` names; ``raycyto.referral.conformal`` scores exactly these.
CONFORMAL_SCORES = ("aps", "lac")
#: ``mc.set_keep`` names: which prediction sets rule "set" keeps (raycyto.referral.policy).
SET_KEEP = ("single", "negative")


def metric_mode(metric: str) -> str:
    """Return "min" for loss metrics and "max" for the others (``val_loss`` -> "min")."""
    return "min" if metric.endswith("loss") else "max"


@dataclass(frozen=True)
class SyntheticConfig:
    """Arguments for ``raycyto.synth.generate`` when ``data.source == "synthetic"``.

    ``class_counts`` (leukemia) asks for images per class, ``{HLT: 59, ALL: 49, ...}``, grouped
    ``per_patient`` to a patient (a class's last patient holds the remainder); the counts then
    decide the number of patients: leave ``patients`` null, or it must match.
    """

    task: str = "karyogram"
    patients: Optional[int] = None  # null: 60, or as many as class_counts needs
    per_patient: int = 2
    seed: int = 0
    size: Optional[int] = 416
    abnormal_fraction: Optional[float] = None
    class_counts: Optional[dict[str, int]] = None

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``raycyto.synth.generate`` after ``task`` and ``out``."""
        kw = {"patients": self.patients, "per_patient": self.per_patient, "seed": self.seed, "size": self.size}
        if self.abnormal_fraction is not None:
            kw["abnormal_fraction"] = self.abnormal_fraction
        if self.class_counts is not None:
            kw["class_counts"] = self.class_counts
        return kw

    def _check(self, prefix: str) -> None:
        if self.patients is not None:
            _positive(self, prefix, "patients")
        _positive(self, prefix, "per_patient")
        if self.size is not None and self.size < 16:
            raise ConfigError(f"{prefix}.size", f"expected >= 16 pixels, got {self.size}")
        if self.abnormal_fraction is not None and not 0 < self.abnormal_fraction < 1:
            raise ConfigError(f"{prefix}.abnormal_fraction",
                              f"expected 0 < value < 1, got {self.abnormal_fraction}")
        if self.class_counts is not None:
            from raycyto.synth.core import patients_from_counts

            patients_from_counts(self.task, self.class_counts, self.per_patient, self.patients,
                                 field=f"{prefix}.class_counts")


@dataclass(frozen=True)
class DataConfig:
    """Where images come from and how they are decoded, augmented and balanced."""

    source: str = "synthetic"
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    classes: Optional[tuple[str, ...]] = None
    positive_class: Optional[str] = None
    image_size: int = 224
    input_size: Optional[int] = None
    policy: str = "none"
    copies: int = 1
    equalize: bool = False
    class_weights: bool = False
    #: ordered karyograms: a layout file (JSON or CSV of chromosome boxes,
    #: raycyto.evidence.layout) that names chromosomes in the report's evidence and in the
    #: exported model's answers; None: the built-in one for raycyto.synth karyograms, else maps only
    layout: Optional[str] = None

    def _check(self, prefix: str) -> None:
        if not self.source:
            raise ConfigError(f"{prefix}.source", "expected a path, URI or 'synthetic'")
        if self.layout is not None and not self.layout.strip():
            raise ConfigError(f"{prefix}.layout", "expected a layout file (JSON or CSV) or null, got ''")
        _positive(self, prefix, "image_size", "copies")
        if self.input_size is not None and self.input_size < 16:
            raise ConfigError(f"{prefix}.input_size", f"expected >= 16 or null, got {self.input_size}")
        if self.classes is not None:
            if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
                raise ConfigError(f"{prefix}.classes",
                                  f"expected at least 2 distinct class names, got {list(self.classes)}")
            if self.positive_class is not None and self.positive_class not in self.classes:
                raise ConfigError(f"{prefix}.positive_class",
                                  f"{self.positive_class!r} is not one of data.classes {list(self.classes)}")
        try:
            from raycyto.data.augment import POLICIES
        except ImportError:  # data package not installed yet: policy checked when used
            return
        if self.policy not in POLICIES:
            raise ConfigError(f"{prefix}.policy",
                              f"unknown policy {self.policy!r}; known: {sorted(POLICIES)}")


@dataclass(frozen=True)
class CVConfig:
    """Group-aware stratified k-fold cross-validation."""

    folds: int = 5
    val_fraction: float = 0.2
    seed: int = 0

    def _check(self, prefix: str) -> None:
        if self.folds < 2:
            raise ConfigError(f"{prefix}.folds", f"expected >= 2, got {self.folds}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"{prefix}.val_fraction", f"expected 0 < value < 1, got {self.val_fraction}")


@dataclass(frozen=True)
class GridConfig:
    """The (backbone, finetune, head) cells; every cell runs on every fold."""

    backbones: tuple[str, ...] = ("efficientnet_lite0",)
    finetune: tuple[str, ...] = ("frozen",)
    heads: tuple[str, ...] = ("a",)
    head_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)

    def cells(self) -> list[tuple[str, str, str]]:
        """All (backbone, finetune, head) cells in config order. Spatial heads (``s``) read a
        frozen backbone's feature map: they pair with ``frozen`` only."""
        from raycyto.models.heads import HEADS

        return [(b, f, h) for b in self.backbones for f in self.finetune for h in self.heads
                if f == "frozen" or not (h in HEADS and HEADS[h].reads_map)]

    def _check(self, prefix: str) -> None:
        for name in ("backbones", "finetune", "heads"):
            values = getattr(self, name)
            if not values:
                raise ConfigError(f"{prefix}.{name}", "expected a non-empty list")
            if len(set(values)) != len(values):
                raise ConfigError(f"{prefix}.{name}", f"duplicate entries in {list(values)}")
        for mode in self.finetune:
            if mode not in FINETUNE_MODES:
                raise ConfigError(f"{prefix}.finetune",
                                  f"unknown mode {mode!r}; known: {list(FINETUNE_MODES)}")
        self._drop_stray_head_kwargs(prefix)
        try:
            from raycyto.models.heads import BASELINE_HEADS, HEADS
            from raycyto.models.registry import BACKBONES
        except ImportError:  # models package not installed yet: names checked when used
            return
        for head in self.heads:
            if head in BASELINE_HEADS:
                raise ConfigError(f"{prefix}.heads", f"{head!r} is the baseline every frozen-backbone sweep "
                                                    "fits by itself (results.csv rows probe-<backbone>); "
                                                    "remove it from grid.heads")
        if any(HEADS[h].reads_map for h in self.heads if h in HEADS) and "frozen" not in self.finetune:
            raise ConfigError(f"{prefix}.heads", "spatial heads (s) read a frozen backbone's feature map: "
                                                "add frozen to grid.finetune or remove s")
        for name, known, values in (("backbones", BACKBONES, self.backbones), ("heads", HEADS, self.heads)):
            for value in values:
                if value not in known:
                    raise ConfigError(f"{prefix}.{name}", f"unknown {name[:-1]} {value!r}; known: {sorted(known)}")

    def _drop_stray_head_kwargs(self, prefix: str) -> None:
        """Settings of a registered head that is not in ``heads`` are dropped with a warning, so a
        grid narrows with one override (``--set 'grid.heads=[a,d]'`` on a YAML that sets head s);
        an unknown head name stays an error."""
        stray = [head for head in self.head_kwargs if head not in self.heads]
        if not stray:
            return
        try:
            from raycyto.models.heads import HEADS
        except ImportError:  # models package not installed yet: names checked when used
            HEADS = None
        for head in stray:
            if HEADS is not None and head not in HEADS:
                raise ConfigError(f"{prefix}.head_kwargs.{head}",
                                  f"unknown head {head!r}; known: {sorted(HEADS)}")
        import warnings

        for head in stray:
            warnings.warn(f"{prefix}.head_kwargs.{head}: head {head!r} is not in {prefix}.heads "
                          f"{list(self.heads)}; its settings are ignored", stacklevel=2)
        object.__setattr__(self, "head_kwargs",  # frozen: the checked config drops them once
                           {h: kw for h, kw in self.head_kwargs.items() if h in self.heads})


@dataclass(frozen=True)
class SearchConfig:
    """Bayesian search over (lr, batch_size) inside every grid cell."""

    algorithm: str = "optuna"
    samples: int = 4
    lr: tuple[float, float] = (1e-4, 1e-2)
    batch_size: tuple[int, ...] = (16, 32)
    metric: str = "val_accuracy"
    mode: Optional[str] = None  # null -> "min" for losses, "max" otherwise
    seed: int = 0

    @property
    def resolved_mode(self) -> str:
        """``mode`` or the natural direction of ``metric``."""
        return self.mode or metric_mode(self.metric)

    def _check(self, prefix: str) -> None:
        _choice(prefix, "algorithm", self.algorithm, SEARCH_ALGORITHMS)
        _positive(self, prefix, "samples")
        low, high = self.lr
        if not (0 < low < high):
            raise ConfigError(f"{prefix}.lr", f"expected [low, high] with 0 < low < high, got {list(self.lr)}")
        if not self.batch_size or any(b < 1 for b in self.batch_size):
            raise ConfigError(f"{prefix}.batch_size",
                              f"expected a non-empty list of positive ints, got {list(self.batch_size)}")
        _check_metric(f"{prefix}.metric", self.metric)
        if self.mode not in (None, "min", "max"):
            raise ConfigError(f"{prefix}.mode", f"expected 'min', 'max' or null, got {self.mode!r}")


@dataclass(frozen=True)
class TrainConfig:
    """Per-fold training of a head (frozen) or backbone + head (fine-tuning)."""

    epochs: int = 10
    optimizer: str = "adam"
    schedule: str = "constant"      # "cosine": the learning rate falls to 0 over `epochs` (per epoch)
    loss: str = "cross_entropy"
    select_metric: str = "val_accuracy"
    weight_decay: float = 0.0
    label_smoothing: float = 0.0    # cross-entropy target smoothing (0 = none)
    patience: Optional[int] = None  # stop after this many epochs without improvement
    precision: str = "fp32"         # "bf16": autocast (on the trial's GPU, or the CPU)
    cache_prefix: bool = True       # last1/last2: run the frozen prefix once per (image, copy), cache it

    def _check(self, prefix: str) -> None:
        _positive(self, prefix, "epochs")
        _choice(prefix, "precision", self.precision, PRECISIONS)
        _choice(prefix, "optimizer", self.optimizer, OPTIMIZERS)
        _choice(prefix, "schedule", self.schedule, SCHEDULES)
        _choice(prefix, "loss", self.loss, LOSSES)
        _check_metric(f"{prefix}.select_metric", self.select_metric)
        if self.weight_decay < 0:
            raise ConfigError(f"{prefix}.weight_decay", f"expected >= 0, got {self.weight_decay}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"{prefix}.label_smoothing", f"expected in [0, 1), got {self.label_smoothing}")
        if self.patience is not None and self.patience < 1:
            raise ConfigError(f"{prefix}.patience", f"expected >= 1 or null, got {self.patience}")


@dataclass(frozen=True)
class ResourcesConfig:
    """What each trial and the feature actors request from Ray."""

    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent: Optional[int] = None  # null -> as many as the cluster fits
    feature_actors: int = 1
    feature_batch_size: int = 32
    max_failures: int = 2
    cache_gb: float = 8.0           # largest cached prefix (fp16) per backbone; beyond it images stream

    def _check(self, prefix: str) -> None:
        if self.cpus_per_trial <= 0:
            raise ConfigError(f"{prefix}.cpus_per_trial", f"expected > 0, got {self.cpus_per_trial}")
        if self.gpus_per_trial < 0 or (self.gpus_per_trial > 1 and self.gpus_per_trial != int(self.gpus_per_trial)):
            raise ConfigError(f"{prefix}.gpus_per_trial",
                              f"expected 0, a fraction in (0, 1] or a whole number, got {self.gpus_per_trial}")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise ConfigError(f"{prefix}.max_concurrent", f"expected >= 1 or null, got {self.max_concurrent}")
        _positive(self, prefix, "feature_actors", "feature_batch_size")
        if self.cache_gb < 0:
            raise ConfigError(f"{prefix}.cache_gb", f"expected >= 0, got {self.cache_gb}")
        if self.max_failures < 0:
            raise ConfigError(f"{prefix}.max_failures", f"expected >= 0, got {self.max_failures}")


@dataclass(frozen=True)
class MCConfig:
    """Monte-Carlo dropout at prediction time."""

    passes: int = 100
    threshold: float = 0.8
    ood_false_alarm: Optional[float] = 0.05  # OOD guard: share of in-distribution cases flagged; null: no guard
    # Referral (raycyto.analysis.referral; stored in model.json by export, applied by Serve):
    # vote = refer when the vote confidence < threshold (the studies); set = refer when the
    # conformal prediction set is not one class; risk = refer below the risk-controlled threshold.
    refer_rule: str = "vote"
    target_recall: Optional[float] = 0.95  # binary tasks: positive recall among kept cases; null: off
    risk_delta: float = 0.1                # the guarantee holds with probability 1 - risk_delta
    coverage: float = 0.9                  # level of the served prediction set (and of rule "set")
    conformal_levels: tuple[float, ...] = (0.9, 0.95)  # levels calibrated and reported
    conformal_score: str = "aps"           # served set: aps (randomized per image) or lac (smallest sets)
    # served set: one threshold per class (class-conditional coverage); null: per class on binary
    # tasks (the positive class gets its own guarantee), marginal on multiclass ones
    conformal_mondrian: Optional[bool] = None
    # rule "set" keeps a case when its set is exactly one class ("single"), or, binary tasks,
    # only when it is exactly {negative class} ("negative": with Mondrian sets, a sensitivity
    # guarantee: a positive case is kept with probability <= 1 - coverage)
    set_keep: str = "single"

    def _check(self, prefix: str) -> None:
        _positive(self, prefix, "passes")
        if not 0 < self.threshold <= 1:
            raise ConfigError(f"{prefix}.threshold", f"expected 0 < value <= 1, got {self.threshold}")
        if self.ood_false_alarm is not None and not 0 < self.ood_false_alarm < 1:
            raise ConfigError(f"{prefix}.ood_false_alarm", f"expected 0 < value < 1 or null, got {self.ood_false_alarm}")
        _choice(prefix, "refer_rule", self.refer_rule, REFER_RULES)
        _choice(prefix, "conformal_score", self.conformal_score, CONFORMAL_SCORES)
        _choice(prefix, "set_keep", self.set_keep, SET_KEEP)
        if self.target_recall is not None and not 0 < self.target_recall < 1:
            raise ConfigError(f"{prefix}.target_recall", f"expected 0 < value < 1 or null, got {self.target_recall}")
        if not 0 < self.risk_delta < 1:
            raise ConfigError(f"{prefix}.risk_delta", f"expected 0 < value < 1, got {self.risk_delta}")
        for name, values in (("coverage", (self.coverage,)), ("conformal_levels", self.conformal_levels)):
            if not values or any(not 0 < v < 1 for v in values):
                raise ConfigError(f"{prefix}.{name}", f"expected level(s) in (0, 1) such as 0.9, got {values}")
        if self.refer_rule == "risk" and self.target_recall is None:
            raise ConfigError(f"{prefix}.target_recall", "refer_rule 'risk' needs a target recall (e.g. 0.95)")


STORAGE_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "hdfs", "file")  # what pyarrow.fs opens


@dataclass(frozen=True)
class SweepConfig:
    """A whole sweep: data, cross-validation, grid, search, training, resources, MC, storage."""

    name: str = "sweep"
    data: DataConfig = field(default_factory=DataConfig)
    cv: CVConfig = field(default_factory=CVConfig)
    grid: GridConfig = field(default_factory=GridConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    mc: MCConfig = field(default_factory=MCConfig)
    storage: str = "./experiments"

    def _check(self, prefix: str) -> None:
        if not self.name or "/" in self.name:
            raise ConfigError("name", f"expected a non-empty name without '/', got {self.name!r}")
        if not self.storage.strip():
            raise ConfigError("storage", "expected a folder or an object-store URI, got ''")
        if "://" in self.storage:
            scheme, rest = self.storage.split("://", 1)
            if scheme not in STORAGE_SCHEMES or not rest.strip("/"):
                raise ConfigError("storage", f"expected a folder or a URI like s3://bucket/prefix "
                                             f"({', '.join(STORAGE_SCHEMES)}), got {self.storage!r}")

    def replace(self, **sections: Any) -> "SweepConfig":
        """A copy with whole sections or dotted fields replaced: ``cfg.replace(**{"data.source": p})``.

        Raises:
            ConfigError: an unknown section or field (named), or an invalid value.
        """
        raw = to_dict(self)
        for key, value in sections.items():
            node = raw
            *parents, leaf = key.split(".")
            for i, part in enumerate(parents):
                if not isinstance(node.get(part), dict):
                    raise ConfigError(".".join(parents[:i + 1]),
                                      f"not a config section; sections: {sorted(k for k, v in node.items() if isinstance(v, dict))}")
                node = node[part]
            if leaf not in node and not (parents and parents[-1] == "head_kwargs"):
                raise ConfigError(key, f"unknown field; known fields: {sorted(node)}")
            node[leaf] = value
        return load_config(raw)

    def override(self, assignments: Sequence[str]) -> "SweepConfig":
        """Apply ``--set section.field=value`` overrides (values parsed as YAML, then validated).

        Example: ``cfg.override(["train.epochs=30", "data.classes=[cat, dog]"])``

        Raises:
            ConfigError: a malformed assignment, an unknown field or an invalid value (named).
        """
        import yaml

        updates: dict[str, Any] = {}
        for text in assignments:
            key, sep, value = str(text).partition("=")
            key = key.strip()
            if not sep or not key:
                raise ConfigError("--set", f"expected section.field=value, got {text!r}")
            try:
                updates[key] = yaml.safe_load(value) if value.strip() else None
            except yaml.YAMLError as exc:
                raise ConfigError(key, f"cannot parse {value!r}: {exc}") from None
        return self.replace(**updates) if updates else self


# ----------------------------------------------------------------------------- loading


def _positive(obj: Any, prefix: str, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value < 1:
            raise ConfigError(f"{prefix}.{name}", f"expected a positive integer, got {value}")


def _choice(prefix: str, name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{prefix}.{name}", f"expected one of {list(choices)}, got {value!r}")


def _check_metric(field_name: str, value: str) -> None:
    known = [f"val_{m}" for m in METRICS]
    if value not in known:
        raise ConfigError(field_name, f"expected one of {known}, got {value!r}")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert lists to tuples."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(where, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(where, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(where, f"expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(where, f"expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(where, f"expected a string, got {value!r}")
        return value
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(where, f"expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(where, f"expected a list of {len(args)} values, got {list(value)}")
        return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(where, f"expected a mapping, got {value!r}")
        return {str(k): _coerce(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    raise TypeError(f"unsupported annotation {tp} at {where}")  # a bug in this module


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(prefix or "config", f"expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            raise ConfigError(_join(prefix, str(key)), f"unknown field; known fields: {sorted(names)}")
    kwargs = {k: _coerce(hints[k], v, _join(prefix, k)) for k, v in raw.items()}
    obj = cls(**kwargs)
    obj._check(prefix)
    return obj


def load_config(source: Union[str, Path, Mapping[str, Any]]) -> SweepConfig:
    """Load and validate a sweep config.

    Args:
        source: a YAML file path or an already parsed mapping.

    Returns:
        The frozen ``SweepConfig``.

    Raises:
        ConfigError: naming the first unknown or invalid field (``search.lr``).
    """
    import yaml

    if isinstance(source, Mapping):
        raw = source
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError("config", f"file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError("config", f"{path} is not valid YAML: {exc}") from None
    return _build(SweepConfig, raw, "")


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain (YAML-safe) dict of a config; tuples become lists."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, Mapping):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(cfg)


def dump_config(cfg: SweepConfig, path: Union[str, Path]) -> Path:
    """Write the resolved config as YAML; ``load_config`` of the file gives back ``cfg``.

    Args:
        cfg: the config.
        path: destination file.

    Returns:
        The path written.
    """
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path

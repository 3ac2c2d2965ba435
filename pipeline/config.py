"""Frozen configuration dataclasses, loaded from TOML and overridable with ``key=value`` strings.

A training run is described by :class:`TrainConfig` (data, network, COLT schedule, the tuned knobs);
certification by :class:`CertifyConfig`. Study files (``studies/*.toml``) hold a ``[train]`` table
with the same keys, plus search-space and certification tables read by :mod:`pipeline.study`.

    cfg = load_train_config("studies/quickstart.toml", overrides=["batch_size=64"])

Every field is validated at construction (``__post_init__``); unknown keys, wrong types and
out-of-range values raise :class:`ConfigError` with one line naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

DATASETS = ("cifar10", "mnist", "fashion_mnist", "digits")
NET_PATTERN = re.compile(r"^(fc(_\d+)+|convmed_\d+_\d+_\d+|convmedbig_\d+_\d+_\d+_\d+)$")

# The tuned knobs of a COLT study: the search space may only name these fields of TrainConfig.
TUNED_KNOBS = (
    "batch_size",
    "eps_initial_factor",
    "eps_decay_factor",
    "l1_reg",
    "relu_stable",
    "relu_stable_factor",
)


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _check_positive(name: str, value: float) -> None:
    _check(math.isfinite(value) and value > 0, f"{name} = {value}: must be a finite number > 0")


@dataclass(frozen=True)
class DataConfig:
    """Which data set, where it lives, and the seeded train/validation split."""

    dataset: Literal["cifar10", "mnist", "fashion_mnist", "digits"] = "digits"
    data_dir: str = "data"
    download: bool = True
    # Images carved out of the training set for validation; scaled down for small sets (digits).
    n_valid: int = 5000
    split_seed: int = 0
    augment: bool = True
    num_workers: int = 0
    # Budget for tuning trials: train on a seeded random subset of at most this many images of
    # the training split (0: all). Launches always use the full training set.
    max_train_images: int = 0

    def __post_init__(self) -> None:
        _check(self.dataset in DATASETS, f"dataset = {self.dataset!r}: allowed {', '.join(DATASETS)}")
        _check(self.n_valid >= 0, f"n_valid = {self.n_valid}: must be >= 0")
        _check(self.num_workers >= 0, f"num_workers = {self.num_workers}: must be >= 0")
        _check(self.max_train_images >= 0,
               f"max_train_images = {self.max_train_images}: must be >= 0 (0: all)")


@dataclass(frozen=True)
class TrainConfig:
    """One COLT training run: network, stages, schedules and the tuned knobs.

    Stage j trains on latent layer ``latent_layers[j]`` (-1 is the input, i.e. input PGD) at
    eps * eps_initial_factor / eps_decay_factor**j; its "previous" layer is latent_layers[j-1]
    (-2, the natural loss, for stage 0).
    """

    data: DataConfig = field(default_factory=DataConfig)
    net: str = "convmed_1_1_100"
    eps: float = 0.1
    latent_layers: tuple[int, ...] = (-1, 2, 4)
    epochs_per_stage: int = 200
    mix_epochs: int = 60
    # --- the tuned knobs (TUNED_KNOBS) ---
    batch_size: int = 100
    eps_initial_factor: float = 1.05
    eps_decay_factor: float = 1.1
    l1_reg: float = 1e-5
    relu_stable: float = 0.005
    relu_stable_factor: float = 1.5
    # --- optimiser ---
    lr: float = 0.03
    lr_layer_dec: float = 0.75
    lr_step: int = 10
    lr_factor: float = 0.5
    momentum: float = 0.9
    # --- latent attack and bounds ---
    attack_steps: int = 8
    attack_step_size: float = 0.25
    test_attack_steps: int = 40
    test_attack_step_size: float = 0.035
    bounds: Literal["cauchy", "exact"] = "cauchy"
    n_rand_proj: int = 50
    seed: int = 100
    deterministic: bool = False
    device: str = "auto"

    def __post_init__(self) -> None:
        _check(bool(NET_PATTERN.match(self.net)),
               f"net = {self.net!r}: allowed fc_<h>[_<h>...], convmed_<w1>_<w2>_<lin>, "
               "convmedbig_<w1>_<w2>_<w3>_<lin>")
        _check_positive("eps", self.eps)
        _check(len(self.latent_layers) >= 1 and self.latent_layers[0] == -1,
               f"latent_layers = {list(self.latent_layers)}: must start with -1 (input PGD stage)")
        _check(all(a < b for a, b in zip(self.latent_layers, self.latent_layers[1:])),
               f"latent_layers = {list(self.latent_layers)}: must be strictly increasing")
        _check(self.epochs_per_stage >= 1, f"epochs_per_stage = {self.epochs_per_stage}: must be >= 1")
        _check(self.mix_epochs >= 0, f"mix_epochs = {self.mix_epochs}: must be >= 0")
        _check(self.batch_size >= 1, f"batch_size = {self.batch_size}: must be >= 1")
        _check_positive("eps_initial_factor", self.eps_initial_factor)
        _check_positive("eps_decay_factor", self.eps_decay_factor)
        _check(self.l1_reg >= 0, f"l1_reg = {self.l1_reg}: must be >= 0")
        _check(self.relu_stable >= 0, f"relu_stable = {self.relu_stable}: must be >= 0")
        _check(self.relu_stable_factor > 0,
               f"relu_stable_factor = {self.relu_stable_factor}: must be > 0")
        _check_positive("lr", self.lr)
        _check(0 < self.lr_layer_dec <= 1, f"lr_layer_dec = {self.lr_layer_dec}: must be in (0, 1]")
        _check(self.lr_step >= 1, f"lr_step = {self.lr_step}: must be >= 1")
        _check(0 < self.lr_factor <= 1, f"lr_factor = {self.lr_factor}: must be in (0, 1]")
        _check(0 <= self.momentum < 1, f"momentum = {self.momentum}: must be in [0, 1)")
        _check(self.attack_steps >= 1, f"attack_steps = {self.attack_steps}: must be >= 1")
        _check(self.test_attack_steps >= 1,
               f"test_attack_steps = {self.test_attack_steps}: must be >= 1")
        _check(self.attack_step_size > 0, f"attack_step_size = {self.attack_step_size}: must be > 0")
        _check(self.bounds in ("cauchy", "exact"), f"bounds = {self.bounds!r}: allowed cauchy, exact")
        _check(self.n_rand_proj >= 1, f"n_rand_proj = {self.n_rand_proj}: must be >= 1")

    @property
    def num_stages(self) -> int:
        return len(self.latent_layers)

    def stage_eps(self, stage: int) -> float:
        """Training ε of a stage: inflated at the start, shrinking by eps_decay_factor per layer."""
        return self.eps * self.eps_initial_factor / self.eps_decay_factor**stage

    def stage_layers(self, stage: int) -> tuple[int, int, int | None]:
        """(prev, curr, next) latent indices of a stage; prev -2 means the natural loss."""
        layers = (-2, *self.latent_layers)
        nxt = layers[stage + 2] if stage + 2 < len(layers) else None
        return layers[stage], layers[stage + 1], nxt

    def stage_lr(self, stage: int) -> float:
        return self.lr * self.lr_layer_dec**stage

    def stage_relu_stable(self, stage: int) -> float:
        return self.relu_stable * self.relu_stable_factor**stage


@dataclass(frozen=True)
class CertifyConfig:
    """The certification cascade: attack, zonotope with optimised slopes, LP refinement, MILP."""

    pgd_restarts: int = 20
    pgd_steps: int = 100
    # Step in units of ε (COLT: 0.015 in noise-coefficient units of a box of half-width 1).
    pgd_step_size: float = 0.015
    slope_iters: int = 500
    slope_lr: float = 0.1
    slope_lr_step: int = 100
    lp_refine: bool = False
    lp_refine_max_neurons: int = 200
    milp: bool = True
    # Latent (block) index where the exact zonotope starts the MILP; -1 = last ReLU's input region.
    milp_layer: int = -1
    max_binary_per_layer: int = 30
    max_binary_total: int = 100
    timeout_per_input_s: float = 60.0
    solver: Literal["highs", "gurobi", "auto"] = "highs"
    # A lower bound certifies only when it exceeds the bound on the floating-point error of that
    # input's computation (pipeline.certify.fp_error, derived per input and margin row). A bound
    # an LP/MILP solver reports holds up to its tolerances: it must clear that error bound by
    # this much more (zonotope bounds need nothing more).
    margin_tolerance: float = 1e-6
    n_inputs: int = 0  # 0 = all inputs of the split
    seed: int = 0
    # A cheap attack runs before the zonotope; the full one (pgd_restarts x pgd_steps) only if
    # the zonotope with slopes fails. Same total travel: step = pgd_step_size*pgd_steps/quick_steps.
    pgd_quick_restarts: int = 2
    pgd_quick_steps: int = 20
    # Encode the MILP from the input box through every layer (complete when all unstable ReLUs
    # get a binary: for small nets) instead of from the exact zonotope at milp_layer.
    milp_from_input: bool = False
    solver_threads: int = 1
    # Stop the slope optimisation when its loss has not improved by 0.1% in this many steps
    # (0: never); the MILP then takes over.
    slope_patience: int = 25
    # Precision of the first zonotope (DeepZ). "float32" is 3-4x faster on a CPU (oneDNN's
    # float32 convolutions) and stays sound: fp_error then bounds that computation's rounding
    # with float32's unit roundoff, so the thresholds grow (a little); it applies to float32
    # models on the CPU only (a float64 model, or a GPU, whose float32 convolutions may use
    # TF32 or Winograd, keeps float64). Meant for validation scoring.
    zonotope_dtype: Literal["float64", "float32"] = "float64"

    def __post_init__(self) -> None:
        _check(self.zonotope_dtype in ("float64", "float32"),
               f"zonotope_dtype = {self.zonotope_dtype!r}: allowed float64, float32")
        _check(self.slope_patience >= 0, f"slope_patience = {self.slope_patience}: must be >= 0")
        _check(self.pgd_quick_restarts >= 0,
               f"pgd_quick_restarts = {self.pgd_quick_restarts}: must be >= 0")
        _check(self.pgd_quick_steps >= 1, f"pgd_quick_steps = {self.pgd_quick_steps}: must be >= 1")
        _check(self.solver_threads >= 1, f"solver_threads = {self.solver_threads}: must be >= 1")
        _check(self.milp_layer >= -1, f"milp_layer = {self.milp_layer}: must be >= -1")
        _check(self.pgd_restarts >= 0, f"pgd_restarts = {self.pgd_restarts}: must be >= 0")
        _check(self.pgd_steps >= 1, f"pgd_steps = {self.pgd_steps}: must be >= 1")
        _check(self.slope_iters >= 0, f"slope_iters = {self.slope_iters}: must be >= 0")
        _check(self.max_binary_per_layer >= 0,
               f"max_binary_per_layer = {self.max_binary_per_layer}: must be >= 0")
        _check(self.max_binary_total >= 0,
               f"max_binary_total = {self.max_binary_total}: must be >= 0")
        _check(self.timeout_per_input_s > 0,
               f"timeout_per_input_s = {self.timeout_per_input_s}: must be > 0")
        _check(self.solver in ("highs", "gurobi", "auto"),
               f"solver = {self.solver!r}: allowed highs, gurobi, auto")
        _check(self.margin_tolerance >= 0, f"margin_tolerance = {self.margin_tolerance}: must be >= 0")
        _check(self.n_inputs >= 0, f"n_inputs = {self.n_inputs}: must be >= 0")


# ---------------------------------------------------------------------------------------------
# Generic TOML -> dataclass machinery


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotated type ``tp`` (TOML already gives typed values)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        _check(isinstance(value, dict), f"{key}: expected a table, got {type(value).__name__}")
        return from_dict(tp, value, prefix=f"{key}.")
    if origin is Literal:
        allowed = typing.get_args(tp)
        _check(value in allowed, f"{key} = {value!r}: allowed {', '.join(map(str, allowed))}")
        return value
    if origin is tuple:
        _check(isinstance(value, (list, tuple)), f"{key}: expected a list, got {value!r}")
        (item_tp, _ellipsis) = typing.get_args(tp)
        return tuple(_coerce(v, item_tp, key) for v in value)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key} = {value!r}: expected {tp}")
    if tp is float:
        _check(isinstance(value, (int, float)) and not isinstance(value, bool),
               f"{key} = {value!r}: expected a number")
        return float(value)
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool),
               f"{key} = {value!r}: expected an integer")
        return value
    if tp is bool:
        _check(isinstance(value, bool), f"{key} = {value!r}: expected true or false")
        return value
    if tp is str:
        _check(isinstance(value, str), f"{key} = {value!r}: expected a string")
        return value
    if tp is dict or origin is dict:
        _check(isinstance(value, dict), f"{key}: expected a table")
        return value
    raise ConfigError(f"{key}: unsupported field type {_type_name(tp)}")


def from_dict(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a dict, rejecting unknown keys and badly typed values."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]}: allowed keys are "
                          f"{', '.join(prefix + n for n in names)}")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{prefix}{err}" if prefix and not str(err).startswith(prefix) else str(err))


def to_dict(obj: Any) -> dict[str, Any]:
    """Plain dict of builtins (tuples become lists) for TOML-like storage and checkpoints."""
    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return {k: plain(v) for k, v in dataclasses.asdict(obj).items()}


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value), the value parsed as a TOML value (bare words: strings)."""
    _check("=" in text, f"--set {text!r}: expected key=value")
    key, raw = (s.strip() for s in text.split("=", 1))
    _check(bool(key), f"--set {text!r}: empty key")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word such as cifar10 or cpu
    return key.split("."), value


def apply_overrides(values: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Return a copy of nested ``values`` with each ``key=value`` override written in."""
    import copy

    result = copy.deepcopy(values)
    for text in overrides:
        path, value = parse_override(text)
        node = result
        for part in path[:-1]:
            node = node.setdefault(part, {})
            _check(isinstance(node, dict), f"--set {text!r}: {part} is not a table")
        node[path[-1]] = value
    return result


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file; a missing or malformed file is a ConfigError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: malformed TOML: {err}") from None


def load_train_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """TrainConfig from the ``[train]`` table of a config/study file plus ``--set`` overrides."""
    raw = read_toml(path)
    if "train" not in raw:
        raise ConfigError(f"{path}: no [train] table (tables found: {', '.join(raw) or 'none'})")
    table = raw["train"]
    try:
        return from_dict(TrainConfig, apply_overrides(table, overrides))
    except ConfigError as err:
        raise ConfigError(f"{path}: [train] {err}") from None


def load_certify_config(path: str | Path | None, table: str = "certify",
                        overrides: list[str] | tuple[str, ...] = ()) -> CertifyConfig:
    raw = read_toml(path).get(table, {}) if path else {}
    try:
        return from_dict(CertifyConfig, apply_overrides(raw, overrides))
    except ConfigError as err:
        raise ConfigError(f"{path}: [{table}] {err}") from None

"""Study files: what a tuning study trains, searches, scores and launches.

A study file (``studies/<name>.toml``) holds:

* ``[study]``: name, sampler, pruner, objective, trial count, ...;
* ``[train]``: the base TrainConfig (the published hyperparameters for the paper studies);
* ``[trial]``: TrainConfig overrides for tuning trials (the per-trial budget, e.g. fewer epochs);
* ``[launch]``: TrainConfig overrides for the launch of the best trial (the paper's schedule);
* ``[search.<knob>]``: the search space of the tuned knobs (``low``/``high``/``log``/``step`` or
  ``choices``); only the names in :data:`pipeline.config.TUNED_KNOBS` may appear;
* ``[certify_val]`` and ``[certify_test]``: CertifyConfig for trial scoring and for the launch.

    study = load_study_file("studies/quickstart.toml")
    cfg = study.trial_config({"batch_size": 64})
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.config import (
    TUNED_KNOBS,
    CertifyConfig,
    ConfigError,
    TrainConfig,
    _check,
    apply_overrides,
    from_dict,
    read_toml,
)

SAMPLERS = ("tpe", "gp", "random", "nsga2")
PRUNERS = ("paired", "median", "hyperband", "successive_halving", "none")


@dataclass(frozen=True)
class SearchParam:
    """One tuned knob: a float/int range (optionally log or stepped) or a list of choices."""

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] | None = None

    def __post_init__(self) -> None:
        _check(self.name in TUNED_KNOBS,
               f"search.{self.name}: not a tuned knob; allowed {', '.join(TUNED_KNOBS)}")
        if self.choices is not None:
            _check(len(self.choices) > 0, f"search.{self.name}.choices: empty list")
            _check(self.low is None and self.high is None,
                   f"search.{self.name}: give either choices or low/high, not both")
            return
        _check(self.low is not None and self.high is not None,
               f"search.{self.name}: needs low and high (or choices)")
        _check(self.low < self.high,
               f"search.{self.name}: empty range low={self.low} >= high={self.high}")
        _check(not self.log or self.low > 0, f"search.{self.name}: log scale needs low > 0")

    @property
    def is_int(self) -> bool:
        return self.name == "batch_size"

    def suggest(self, trial: Any) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.is_int:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log,
                                     step=int(self.step or 1))
        return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)

    def contains(self, value: Any) -> bool:
        if self.choices is not None:
            return value in self.choices
        return self.low <= value <= self.high


@dataclass(frozen=True)
class StudySettings:
    """The ``[study]`` table."""

    name: str
    n_trials: int = 20
    sampler: Literal["tpe", "gp", "random", "nsga2"] = "tpe"
    # "paired": prune only when this trial's per-image certified outcomes at a stage are
    # significantly worse (exact one-sided McNemar at pruner_alpha) than the reference trial's on
    # the same validation images (pipeline/pruning.py); "median": Optuna's MedianPruner.
    pruner: Literal["paired", "median", "hyperband", "successive_halving", "none"] = "paired"
    pruner_alpha: float = 0.05
    # The paired pruner never acts on fewer validation images than this.
    pruner_min_images: int = 100
    # Pruning is never done before this many stages have reported.
    pruner_warmup_stages: int = 1
    pruner_startup_trials: int = 2
    # Validation images scored after every stage but the last (what the pruner sees), the first
    # of those the last stage scores ([certify_val] n_inputs); 0: as many as the last stage.
    stage_inputs: int = 0
    objective: Literal["cert", "pareto"] = "cert"
    # Constraint for objective "cert": trials below this validation natural accuracy are infeasible.
    min_nat_acc: float = 0.0
    enqueue_published: bool = True
    # The published point is queued this many times, with training seeds train.seed + 0..k-1, so
    # the analysis can draw the seed band the other trials are compared against.
    seed_repeats: int = 1
    seed: int = 0
    # Random trials before TPE / GP model the results (the published point counts as one).
    sampler_startup_trials: int = 5
    heartbeat_interval_s: int = 60
    grace_period_s: int = 180
    max_retry: int = 3
    # Published result for this setting (natural %, certified %), shown in the analysis figures.
    published_nat_acc: float | None = None
    published_cert_acc: float | None = None

    def __post_init__(self) -> None:
        _check(bool(self.name.strip()), "study.name: must not be empty")
        _check(self.n_trials >= 1, f"study.n_trials = {self.n_trials}: must be >= 1")
        _check(self.sampler in SAMPLERS, f"study.sampler = {self.sampler!r}: allowed {SAMPLERS}")
        _check(self.pruner in PRUNERS, f"study.pruner = {self.pruner!r}: allowed {PRUNERS}")
        _check(self.objective in ("cert", "pareto"),
               f"study.objective = {self.objective!r}: allowed cert, pareto")
        _check(0 <= self.min_nat_acc <= 1, f"study.min_nat_acc = {self.min_nat_acc}: in [0, 1]")
        _check(self.stage_inputs >= 0, f"study.stage_inputs = {self.stage_inputs}: must be >= 0")
        _check(self.heartbeat_interval_s >= 1, "study.heartbeat_interval_s: must be >= 1")
        _check(self.grace_period_s > self.heartbeat_interval_s,
               "study.grace_period_s: must be larger than heartbeat_interval_s")


@dataclass(frozen=True)
class StudyFile:
    path: str
    settings: StudySettings
    base: TrainConfig
    trial_overrides: dict[str, Any] = field(default_factory=dict)
    launch_overrides: dict[str, Any] = field(default_factory=dict)
    search: tuple[SearchParam, ...] = ()
    certify_val: CertifyConfig = field(default_factory=CertifyConfig)
    certify_test: CertifyConfig = field(default_factory=CertifyConfig)

    def _with(self, overrides: dict[str, Any], knobs: dict[str, Any], table: str = ""
              ) -> TrainConfig:
        values = dataclasses.asdict(self.base)
        values = _merge(_merge(values, overrides), knobs)
        try:
            return from_dict(TrainConfig, values)
        except ConfigError as err:
            where = f"[{table}] " if table else ""
            raise ConfigError(f"{self.path}: {where}{err}") from None

    def trial_config(self, knobs: dict[str, Any]) -> TrainConfig:
        """TrainConfig of a tuning trial: base + [trial] budget + the sampled knobs."""
        return self._with(self.trial_overrides, knobs, "trial")

    def launch_config(self, knobs: dict[str, Any]) -> TrainConfig:
        """TrainConfig of a launch: base + [launch] schedule + the chosen trial's knobs."""
        return self._with(self.launch_overrides, knobs, "launch")

    def published_knobs(self) -> dict[str, Any]:
        """The base config's values of the searched knobs (the paper's, for paper studies)."""
        return {p.name: getattr(self.base, p.name) for p in self.search}


def _merge(values: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(values)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_study_file(path: str | Path, overrides: tuple[str, ...] | list[str] = ()) -> StudyFile:
    """Read and validate a study file; any problem is one ConfigError naming file and key."""
    raw = apply_overrides(read_toml(path), overrides)
    known = {"study", "train", "trial", "launch", "search", "certify_val", "certify_test"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown table [{unknown[0]}]; allowed {', '.join(sorted(known))}")
    try:
        if "study" not in raw or "name" not in raw["study"]:
            raise ConfigError("[study] name is missing")
        settings = from_dict(StudySettings, raw["study"], prefix="study.")
        base = from_dict(TrainConfig, raw.get("train", {}), prefix="train.")
        search = []
        for name, spec in raw.get("search", {}).items():
            _check(isinstance(spec, dict), f"search.{name}: expected a table")
            allowed = {"low", "high", "log", "step", "choices"}
            bad = sorted(set(spec) - allowed)
            _check(not bad, f"unknown key search.{name}.{bad[0] if bad else ''}: allowed "
                            f"{', '.join(sorted(allowed))}")
            search.append(from_dict(SearchParam, {"name": name, **spec}, prefix="search."))
        certify_val = from_dict(CertifyConfig, raw.get("certify_val", {}), prefix="certify_val.")
        certify_test = from_dict(CertifyConfig, raw.get("certify_test", {}),
                                 prefix="certify_test.")
        study = StudyFile(str(path), settings, base, raw.get("trial", {}), raw.get("launch", {}),
                          tuple(search), certify_val, certify_test)
        # Both derived configs must be valid before anything touches a database, and so must
        # every value the search can sample (checked at the ends of each range).
        knobs = study.published_knobs()
        study.trial_config(knobs)
        study.launch_config(knobs)
        for param in study.search:
            ends = (("choices", v) for v in param.choices) if param.choices is not None else (
                ("low", param.low), ("high", param.high))
            for key, value in ends:
                value = int(value) if param.is_int and key != "choices" else value
                try:
                    from_dict(TrainConfig, {**dataclasses.asdict(base), param.name: value},
                              prefix="")
                except ConfigError as err:
                    raise ConfigError(f"search.{param.name}.{key} = {value!r}: {err}") from None
    except ConfigError as err:
        message = str(err)
        raise ConfigError(message if message.startswith(str(path)) else f"{path}: {message}"
                          ) from None
    return study

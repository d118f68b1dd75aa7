"""A search space: dotted config keys (the same as `tunelab train` overrides) mapped to distributions.

    train.lr:            {low: 1.0e-5, high: 1.0e-3, log: true}   # float (log-uniform)
    train.warmup_ratio:  {low: 0.0, high: 0.2}                    # float
    train.epochs:        {type: int, low: 1, high: 4}             # int (`step` optional)
    train.batch_size:    {choices: [16, 32, 64]}                  # categorical
    method.name:         [full, lora]                             # a list is categorical too

The type is `type:` when given, categorical with `choices:` (or a plain list), int when `low` and `high` are both
integers, else float. Every key is checked against the run config before any trial runs: each bound and each
choice must make a valid config, so a typo fails at once with the key named.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from tunelab.config import apply_overrides, read_yaml_mapping, validate
from tunelab.errors import UserError

TYPES = ("float", "int", "categorical")


@dataclass(frozen=True)
class Param:
    key: str  # dotted config key
    type: str  # float | int | categorical
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple = ()

    def suggest(self, trial):
        """This parameter's value for an Optuna trial."""
        if self.type == "categorical":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.type == "int":
            return trial.suggest_int(self.key, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)

    def values_to_check(self) -> list:
        return list(self.choices) if self.type == "categorical" else [self.low, self.high]

    def describe(self) -> str:
        if self.type == "categorical":
            return f"{self.key} ∈ {{{', '.join(map(str, self.choices))}}}"
        scale = " log" if self.log else ""
        return f"{self.key} ∈ [{self.low}, {self.high}]{scale} ({self.type})"


@dataclass(frozen=True)
class Space:
    params: tuple[Param, ...]

    def suggest(self, trial) -> dict:
        return {p.key: p.suggest(trial) for p in self.params}

    def to_json(self) -> str:
        """A canonical form (what a resumed study compares with the space it was started with)."""
        return json.dumps([{k: v for k, v in p.__dict__.items() if v not in (None, (), False)} for p in self.params],
                          sort_keys=True, default=list)


def overrides(params: dict) -> list[str]:
    """{"train.lr": 3e-5} -> ["train.lr=3e-05"] (JSON values read back as YAML: the same value)."""
    return [f"{k}={json.dumps(v)}" for k, v in params.items()]


def load_space(path: str | Path, base_raw: dict) -> Space:
    """The space file, every key checked against `base_raw` (the run config as read, before validation)."""
    if not Path(path).is_file() and not Path(path).is_dir():
        raise UserError(f"search space file not found: {path}")
    raw = read_yaml_mapping(path, "dotted config keys (train.lr: {low: …, high: …})")
    if not raw:
        raise UserError(f"search space {path} is empty; give at least one key, e.g. train.lr: {{low: 1.0e-5, "
                        "high: 1.0e-3, log: true}")
    params = tuple(_param(str(key), spec, path) for key, spec in raw.items())
    for p in params:
        for value in p.values_to_check():
            try:
                validate(apply_overrides(json.loads(json.dumps(base_raw)), overrides({p.key: value})))
            except UserError as err:
                raise UserError(f"search space {path}: {p.key}={value!r} does not make a valid config: "
                                f"{str(err).removeprefix('invalid config: ')}") from None
    return Space(params)


def _param(key: str, spec, path) -> Param:
    where = f"search space {path}: {key}"
    if not key or "." not in key or any(not part for part in key.split(".")):
        raise UserError(f"{where}: keys are dotted config keys like train.lr")
    if isinstance(spec, list):
        spec = {"choices": spec}
    if not isinstance(spec, dict):
        raise UserError(f"{where}: give {{low: …, high: …}}, {{choices: […]}} or a list, not {spec!r}")
    unknown = set(spec) - {"type", "low", "high", "log", "step", "choices"}
    if unknown:
        raise UserError(f"{where}: unknown field(s) {', '.join(sorted(map(str, unknown)))} (type, low, high, log, "
                        "step, choices)")
    kind = spec.get("type") or ("categorical" if "choices" in spec else None)
    low, high = spec.get("low"), spec.get("high")
    if kind is None:
        kind = "int" if _is_int(low) and _is_int(high) else "float"
    if kind not in TYPES:
        raise UserError(f"{where}: type must be one of {', '.join(TYPES)}, not {kind!r}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise UserError(f"{where}: categorical needs a non-empty list of choices")
        if any(not isinstance(c, (str, int, float, bool)) and c is not None for c in choices):
            raise UserError(f"{where}: choices must be plain values (numbers, strings, booleans, null)")
        if len({json.dumps(c) for c in choices}) != len(choices):
            raise UserError(f"{where}: the choices repeat a value")
        if set(spec) - {"type", "choices"}:
            raise UserError(f"{where}: a categorical takes only choices")
        return Param(key, kind, choices=tuple(choices))
    for name, v in (("low", low), ("high", high)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise UserError(f"{where}: {name} must be a finite number (got {v!r})")
    if kind == "int" and not (_is_int(low) and _is_int(high)):
        raise UserError(f"{where}: an int range needs integer low and high")
    if not low < high:
        raise UserError(f"{where}: low ({low}) must be below high ({high})")
    log, step = spec.get("log", False), spec.get("step")
    if not isinstance(log, bool):
        raise UserError(f"{where}: log must be true or false")
    if log and low <= 0:
        raise UserError(f"{where}: a log scale needs low > 0")
    if step is not None:
        if log:
            raise UserError(f"{where}: step and log cannot be combined")
        if isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0 or (
                kind == "int" and not _is_int(step)):
            raise UserError(f"{where}: step must be a positive {'integer' if kind == 'int' else 'number'}")
    if kind == "int":
        return Param(key, kind, int(low), int(high), log, int(step) if step else None)
    return Param(key, kind, float(low), float(high), log, float(step) if step else None)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)

"""The rules every configuration obeys: each field's type and range, and the rules between fields.

:func:`validate` runs on every :class:`config.Config` made (``__post_init__``); a bad value raises
:class:`ConfigError` naming the field, its flag and its environment variable. The fields themselves, their
defaults and ranges are in ``config.py``; this module reads them from the dataclass it is given.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import fields

ENV_PREFIX = "FL_"


class ConfigError(ValueError):
    """A configuration value is missing, malformed or out of range."""


def field_type(f: dataclasses.Field) -> type:
    """The Python type of config field ``f`` (bool, int, float or str; ``X | None`` counts as X)."""
    t = f.type if isinstance(f.type, str) else f.type.__name__
    for name, typ in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if t.startswith(name):
            return typ
    raise TypeError(f"unsupported config field type {t!r}")  # pragma: no cover - programming error


def validate(cfg) -> None:
    """Check every field's type and range, then the rules between fields.

    Raises
    ------
    ConfigError
        Naming the first bad field, its flag and environment variable, and the allowed range.
    """
    for f in fields(cfg):
        _validate_field(cfg, f)
    if (cfg.partition_id is None) != (cfg.num_partitions is None):
        raise ConfigError("--partition-id and --num-partitions must be given together")
    if (cfg.certfile is None) != (cfg.keyfile is None):
        raise ConfigError("--certfile and --keyfile must be given together")
    for name in ("normalize_mean", "normalize_std"):
        if not all(_is_number(v) for v in getattr(cfg, name).split(",")):
            raise ConfigError(f"{name} ({flag_name(name)} / {env_name(name)}): expected comma-separated numbers, "
                              f"got {getattr(cfg, name)!r}")
    if cfg.strategy == "scaffold" and cfg.aggregation != "fedavg":
        raise ConfigError(f"--strategy scaffold cannot use --aggregation {cfg.aggregation}: its control variates "
                          "correct the mean of the updates, not a median or trimmed mean")
    if cfg.dp_noise_multiplier > 0:
        _validate_privacy(cfg)
    if cfg.partition_id is not None and cfg.partition_id >= cfg.num_partitions:
        raise ConfigError(f"--partition-id must be < --num-partitions ({cfg.num_partitions}), "
                          f"got {cfg.partition_id}")


def _validate_privacy(cfg) -> None:
    """DP-FedAvg's rules: a clip norm (the sensitivity), the mean (no robust rule, whose sensitivity differs),
    no SCAFFOLD (its control-variate changes would be released without noise)."""
    if cfg.clip_norm <= 0:
        raise ConfigError("--dp-noise-multiplier needs --clip-norm > 0: the clip norm S bounds one client's change "
                          "(the noise's standard deviation is z * S)")
    if cfg.aggregation != "fedavg":
        raise ConfigError(f"--dp-noise-multiplier cannot use --aggregation {cfg.aggregation}: the privacy analysis "
                          "is of the noisy mean of clipped changes")
    if cfg.strategy == "scaffold":
        raise ConfigError("--dp-noise-multiplier cannot use --strategy scaffold: its control-variate changes are "
                          "not clipped and noised")


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _validate_field(cfg, f: dataclasses.Field) -> None:
    value = getattr(cfg, f.name)
    if value is None and f.default is None:
        return
    where = f"{f.name} ({flag_name(f.name)} / {env_name(f.name)})"
    typ = field_type(f)
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
        object.__setattr__(cfg, f.name, value)  # frozen dataclass: normalise 1 -> 1.0 once
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {typ.__name__}, got {value!r}")
    if typ is float and not math.isfinite(value):
        raise ConfigError(f"{where}: must be a finite number, got {value!r}")
    lo, hi, choices = f.metadata["lo"], f.metadata["hi"], f.metadata["choices"]
    if lo is not None and value < lo:
        raise ConfigError(f"{where}: must be >= {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise ConfigError(f"{where}: must be <= {hi}, got {value!r}")
    if choices is not None and value not in choices:
        raise ConfigError(f"{where}: must be one of {', '.join(choices)}, got {value!r}")
    if typ is str and not value.strip():
        raise ConfigError(f"{where}: must not be empty")
    if f.name in ("token", "monitor_token", "admin_token") and len(value) < 16:
        raise ConfigError(f"{where}: must be at least 16 characters")


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()

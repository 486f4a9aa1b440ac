"""Run configuration: defaults, strategy specs, strict resolution.

A run is fully described by a ``RunConfig``. Its values are resolved, later
ones winning, from:

1. the ``RunConfig`` defaults below;
2. the protocol's training settings for the benchmark (``cl_bayes.protocols``);
3. the strategy spec ``strategies/<strategy>.toml``: top-level keys, then the
   table ``[benchmark.<id>]``, then ``[benchmark.<id>.<protocol>]``;
4. overrides given on the command line (``--set key=value``).

Keys are either ``RunConfig`` training fields or the strategy's own
hyper-parameters (a dataclass per strategy, see ``cl_bayes.avalanche.strategies``).
Unknown keys and wrong types are errors (``ConfigError``), never ignored.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cl_bayes.protocols import BENCHMARKS, PROTOCOLS, TRAINING

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SPECS_ENV = "CL_BAYES_SPECS"


class ConfigError(ValueError):
    """A configuration or strategy spec is malformed."""


@dataclass
class RunConfig:
    benchmark: str  # benchmark id, see cl_bayes.protocols.BENCHMARKS
    strategy: str  # strategy name, see cl_bayes.avalanche.strategies.STRATEGIES
    seed: int  # seeds the data subsets, permutations, initialisation and training
    protocol: str = "quick"  # "quick" or "paper" (cl_bayes.protocols)
    model: str = "mlp"  # "mlp" or "cnn"
    hidden: list[int] = field(default_factory=lambda: [256, 256])  # MLP hidden widths
    epochs: int = 1  # training epochs per experience
    batch_size: int = 128  # training mini-batch size
    lr: float = 1e-3  # learning rate of the strategy's optimizer
    eval_batch_size: int = 1000  # mini-batch size for evaluation
    train_per_experience: int | None = None  # seeded subset of each experience's training data (None: all)
    test_per_experience: int | None = None  # seeded subset of each experience's test data (None: all)
    first_unpermuted: bool = True  # permuted-mnist: experience 0 keeps the original pixel order
    evaluate_on: str = "test"  # "test", or "validation" (held out from training data, for tuning)
    validation_fraction: float = 0.1  # share of each experience's training data held out when evaluate_on="validation"
    device: str = "cpu"  # torch device
    experiences: int | None = None  # train and score only the first k experiences (bisection; None: all)
    params: dict[str, Any] = field(default_factory=dict)  # the strategy's hyper-parameters

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


TRAINING_FIELDS = frozenset(f.name for f in dataclasses.fields(RunConfig)) - {
    "benchmark", "strategy", "seed", "protocol", "params",
}


def _type_ok(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(annotation)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _annotations(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, annotation: Any) -> Any:
    """Floats given as ints (``lr = 1``) become floats; everything else is kept."""
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def check_fields(values: dict[str, Any], cls, *, where: str) -> dict[str, Any]:
    """Check every key is a field of dataclass ``cls`` with the right type."""
    hints = _annotations(cls)
    out = {}
    for key, value in values.items():
        if key not in hints:
            known = ", ".join(sorted(hints))
            raise ConfigError(f"{where}: unknown key '{key}' (known: {known})")
        if not _type_ok(value, hints[key]):
            raise ConfigError(
                f"{where}: '{key}' must be {getattr(hints[key], '__name__', hints[key])}, got {value!r}"
            )
        out[key] = _coerce(value, hints[key])
    return out


def specs_dir(explicit: str | os.PathLike | None = None) -> Path:
    """Where strategy specs live: ``explicit``, ``$CL_BAYES_SPECS``, ``./strategies``, or the checkout's."""
    if explicit:
        return Path(explicit)
    if os.environ.get(SPECS_ENV):
        return Path(os.environ[SPECS_ENV])
    if Path("strategies").is_dir():
        return Path("strategies")
    return Path(__file__).resolve().parent.parent / "strategies"


def load_spec(strategy: str, directory: str | os.PathLike | None = None) -> tuple[dict[str, Any], Path]:
    """Parse ``<specs>/<strategy>.toml``; return (table, path)."""
    path = specs_dir(directory) / f"{strategy}.toml"
    if not path.is_file():
        raise ConfigError(f"no spec for strategy '{strategy}' at {path}")
    try:
        return tomllib.loads(path.read_text()), path
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: malformed TOML ({e})") from None


def _split_spec(spec: dict[str, Any], benchmark: str, protocol: str, path: Path) -> list[dict[str, Any]]:
    """The spec's layers for this benchmark and protocol: defaults, per benchmark, per protocol."""
    spec = {k: v for k, v in spec.items() if k != "description"}
    per_benchmark = spec.pop("benchmark", {})
    if not isinstance(per_benchmark, dict):
        raise ConfigError(f"{path}: 'benchmark' must be a table of benchmark ids")
    for name, table in per_benchmark.items():
        if name not in BENCHMARKS:
            raise ConfigError(f"{path}: unknown benchmark '{name}' in [benchmark.{name}]")
        for proto, sub in table.items():
            if isinstance(sub, dict) and proto not in PROTOCOLS:
                raise ConfigError(f"{path}: unknown protocol '{proto}' in [benchmark.{name}.{proto}]")
    layer_b = dict(per_benchmark.get(benchmark, {}))
    layer_p = layer_b.pop(protocol, {})
    for proto in PROTOCOLS:
        layer_b.pop(proto, None)
    return [spec, layer_b, layer_p]


def resolve(
    *,
    benchmark: str,
    strategy: str,
    seed: int,
    protocol: str = "quick",
    params_cls,
    spec: dict[str, Any] | None = None,
    spec_path: Path | str = "<spec>",
    overrides: dict[str, Any] | None = None,
) -> RunConfig:
    """Resolve a ``RunConfig`` (see the module docstring for the order)."""
    if benchmark not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark '{benchmark}' (known: {', '.join(BENCHMARKS)})")
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol '{protocol}' (known: {', '.join(PROTOCOLS)})")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    param_names = {f.name for f in dataclasses.fields(params_cls)}
    clash = param_names & set(TRAINING_FIELDS)
    assert not clash, f"strategy parameters shadow training fields: {clash}"

    training: dict[str, Any] = dict(TRAINING[(benchmark, protocol)])
    params: dict[str, Any] = {}
    layers = _split_spec(spec or {}, benchmark, protocol, Path(spec_path))
    sources = [str(spec_path)] * 3
    if overrides:
        layers.append(overrides)
        sources.append("--set")
    for layer, where in zip(layers, sources, strict=True):
        for key, value in layer.items():
            if key in TRAINING_FIELDS:
                training.update(check_fields({key: value}, RunConfig, where=where))
            elif key in param_names:
                params.update(check_fields({key: value}, params_cls, where=where))
            else:
                known = ", ".join(sorted(set(TRAINING_FIELDS) | param_names))
                raise ConfigError(f"{where}: unknown key '{key}' for strategy '{strategy}' (known: {known})")
    try:
        resolved_params = dataclasses.asdict(params_cls(**params))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"strategy '{strategy}': {e}") from None
    config = RunConfig(
        benchmark=benchmark, strategy=strategy, seed=seed, protocol=protocol, params=resolved_params, **training
    )
    _validate(config)
    return config


def _validate(c: RunConfig) -> None:
    positive = ("epochs", "batch_size", "eval_batch_size")
    for name in positive:
        if getattr(c, name) <= 0:
            raise ConfigError(f"{name} must be positive, got {getattr(c, name)}")
    if not c.lr > 0:
        raise ConfigError(f"lr must be positive, got {c.lr}")
    for name in ("train_per_experience", "test_per_experience"):
        if getattr(c, name) is not None and getattr(c, name) <= 0:
            raise ConfigError(f"{name} must be positive or null, got {getattr(c, name)}")
    if c.experiences is not None:
        total = BENCHMARKS[c.benchmark].n_experiences
        if not 1 <= c.experiences <= total:
            raise ConfigError(f"experiences must be between 1 and {total} for {c.benchmark}, got {c.experiences}")
    if c.model not in ("mlp", "cnn"):
        raise ConfigError(f"model must be 'mlp' or 'cnn', got {c.model!r}")
    if c.evaluate_on not in ("test", "validation"):
        raise ConfigError(f"evaluate_on must be 'test' or 'validation', got {c.evaluate_on!r}")
    if not 0 < c.validation_fraction < 1:
        raise ConfigError(f"validation_fraction must be in (0, 1), got {c.validation_fraction}")


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with a TOML value (``lr=1e-3``, ``hidden=[100, 100]``, ``mode="online"``).

    A bare word that is not valid TOML is taken as a string (``model=cnn``).
    """
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = (s.strip() for s in text.split("=", 1))
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value

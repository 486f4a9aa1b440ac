"""Strict run-configuration resolution (cl_bayes.config)."""

from __future__ import annotations

import sys

import pytest
from conftest import SPECS

from cl_bayes import config as C
from cl_bayes.avalanche import strategies
from cl_bayes.avalanche.strategies import EWCParams, NoParams, OnlineEWCParams
from cl_bayes.protocols import BENCHMARKS, PROTOCOLS, TRAINING

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def resolve(spec=None, overrides=None, *, benchmark="permuted-mnist", protocol="quick", params_cls=OnlineEWCParams,
            strategy="online-ewc", seed=0):
    return C.resolve(benchmark=benchmark, strategy=strategy, seed=seed, protocol=protocol, params_cls=params_cls,
                     spec=spec, overrides=overrides)


# Every layer sets some keys; each key is last set by a different layer.
LAYERED_SPEC = {
    "description": "ignored",
    "batch_size": 32,  # top level beats the protocol's 128
    "epochs": 2,
    "ewc_lambda": 5.0,
    "lr": 0.1,
    "benchmark": {
        "permuted-mnist": {
            "epochs": 3,  # [benchmark.X] beats top level
            "ewc_lambda": 6.0,
            "quick": {"ewc_lambda": 7.0, "lr": 0.2},  # [benchmark.X.quick] beats [benchmark.X]
            "paper": {"lr": 0.3, "decay_factor": 0.5},
        },
        "split-mnist": {"batch_size": 1, "lr": 0.9},  # another benchmark: never applied here
    },
}


def test_resolution_order_quick():
    c = resolve(LAYERED_SPEC, {"lr": 0.4})
    protocol = TRAINING[("permuted-mnist", "quick")]
    assert c.hidden == protocol["hidden"] != C.RunConfig("x", "y", 0).hidden  # protocol beats the default
    assert c.train_per_experience == protocol["train_per_experience"]
    assert c.eval_batch_size == C.RunConfig("x", "y", 0).eval_batch_size  # nobody sets it: the default
    assert c.batch_size == 32  # spec top level beats the protocol
    assert c.epochs == 3  # [benchmark.permuted-mnist] beats top level
    assert c.params["ewc_lambda"] == 7.0  # [benchmark.permuted-mnist.quick] beats [benchmark.permuted-mnist]
    assert c.lr == 0.4  # overrides beat everything
    assert c.params["decay_factor"] == OnlineEWCParams().decay_factor  # paper table not applied
    assert (c.benchmark, c.strategy, c.seed, c.protocol) == ("permuted-mnist", "online-ewc", 0, "quick")


def test_resolution_order_paper():
    c = resolve(LAYERED_SPEC, protocol="paper")
    assert c.lr == 0.3 and c.params["decay_factor"] == 0.5  # the paper sub-table
    assert c.params["ewc_lambda"] == 6.0  # no quick table now
    assert c.epochs == 3  # [benchmark.X] still beats the protocol's epochs
    assert c.batch_size == 32
    assert c.train_per_experience is None  # paper protocol: all data


def test_without_spec_the_protocol_and_defaults_apply():
    for (benchmark, protocol), training in TRAINING.items():
        c = resolve(benchmark=benchmark, protocol=protocol)
        for key, value in training.items():
            assert getattr(c, key) == value, (benchmark, protocol, key)
        assert c.params == {"ewc_lambda": OnlineEWCParams().ewc_lambda, "decay_factor": OnlineEWCParams().decay_factor}


def test_shipped_specs_resolve_for_every_benchmark_and_protocol():
    files = sorted(SPECS.glob("*.toml"))
    assert files, f"no strategy specs under {SPECS}"
    for path in files:
        name = path.stem
        definition = strategies.get(name)  # every spec names a registered strategy
        spec, _ = C.load_spec(name, SPECS)
        raw = tomllib.loads(path.read_text())
        for benchmark in BENCHMARKS:
            for protocol in PROTOCOLS:
                c = C.resolve(benchmark=benchmark, strategy=name, seed=1, protocol=protocol,
                              params_cls=definition.params_cls, spec=spec, spec_path=path)
                # what the file says for this benchmark wins over its top level, and its protocol table over that
                table = raw.get("benchmark", {}).get(benchmark, {})
                layer = {**raw, **table, **table.get(protocol, {})}
                settings = {k: v for k, v in layer.items() if k not in ("description", "benchmark")
                            and not isinstance(v, dict)}
                assert settings, name
                for key, value in settings.items():  # every setting, training field or hyper-parameter
                    got = getattr(c, key) if key in C.TRAINING_FIELDS else c.params[key]
                    assert got == value, (name, benchmark, protocol, key)


def test_baseline_specs_exist():
    for name in ("naive", "naive-sgd", "ewc", "online-ewc", "si", "lwf", "replay", "agem", "gem", "cumulative",
                 "joint", "ivon", "ivon-prior"):
        assert (SPECS / f"{name}.toml").is_file(), name


def test_the_resolved_config_is_a_plain_dict():
    d = resolve(LAYERED_SPEC).to_dict()
    assert d["params"] == {"ewc_lambda": 7.0, "decay_factor": 0.9}
    assert d["lr"] == 0.2 and d["benchmark"] == "permuted-mnist"


# --- errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, overrides, needle",
    [
        ({"learning_rate": 0.1}, None, "learning_rate"),  # a typo at the top level
        ({"benchmark": {"permuted-mnist": {"epoch": 2}}}, None, "epoch"),
        ({"benchmark": {"permuted-mnist": {"quick": {"lamda": 2.0}}}}, None, "lamda"),
        (None, {"bogus": 1}, "bogus"),
        (None, {"memory_size": 10}, "memory_size"),  # another strategy's parameter
        (None, {"benchmark": "split-mnist"}, "benchmark"),  # not settable
        (None, {"seed": 3}, "seed"),
        (None, {"params": {}}, "params"),
    ],
)
def test_unknown_keys_are_errors(spec, overrides, needle):
    with pytest.raises(C.ConfigError, match=needle):
        resolve(spec, overrides)


@pytest.mark.parametrize(
    "key, value",
    [
        ("epochs", True),  # bool is not an int
        ("epochs", 1.5),
        ("epochs", "2"),
        ("batch_size", None),
        ("lr", "0.1"),  # str is not a float
        ("lr", False),
        ("hidden", [32, "64"]),
        ("hidden", 32),
        ("train_per_experience", 1.0),
        ("first_unpermuted", 1),  # int is not a bool
        ("model", 3),
        ("ewc_lambda", "big"),
        ("decay_factor", True),
    ],
)
def test_wrong_types_are_errors(key, value):
    with pytest.raises(C.ConfigError, match=key):
        resolve(overrides={key: value})
    with pytest.raises(C.ConfigError, match=key):
        resolve({key: value})


def test_ints_are_accepted_and_stored_as_floats():
    c = resolve({"lr": 1, "ewc_lambda": 100}, {"decay_factor": 1})
    assert c.lr == 1.0 and type(c.lr) is float
    assert c.params["ewc_lambda"] == 100.0 and type(c.params["ewc_lambda"]) is float
    assert type(c.params["decay_factor"]) is float


def test_optional_ints_accept_none():
    c = resolve(overrides={"train_per_experience": None, "test_per_experience": 5})
    assert c.train_per_experience is None and c.test_per_experience == 5


@pytest.mark.parametrize(
    "spec, needle",
    [
        ({"benchmark": {"split-nmist": {"lr": 0.1}}}, "split-nmist"),  # unknown benchmark table
        ({"benchmark": {"permuted-mnist": {"fast": {"lr": 0.1}}}}, "fast"),  # unknown protocol table
        ({"benchmark": {"split-mnist": {"paperr": {"lr": 0.1}}}}, "paperr"),  # even for another benchmark
        ({"benchmark": 3}, "benchmark"),
    ],
)
def test_unknown_tables_in_specs_are_errors(spec, needle):
    with pytest.raises(C.ConfigError, match=needle):
        resolve(spec)


@pytest.mark.parametrize(
    "args, needle",
    [
        ({"benchmark": "split-cifar100"}, "split-cifar100"),
        ({"protocol": "fast"}, "fast"),
        ({"seed": -1}, "seed"),
        ({"seed": True}, "seed"),
    ],
)
def test_unknown_benchmark_protocol_and_bad_seed(args, needle):
    with pytest.raises(C.ConfigError, match=needle):
        resolve(**args)


def test_unknown_strategy():
    with pytest.raises(C.ConfigError, match="no spec for strategy 'nope'"):
        C.load_spec("nope", SPECS)
    with pytest.raises(KeyError, match="nope"):
        strategies.get("nope")


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({"epochs": 0}, "epochs"),
        ({"batch_size": -1}, "batch_size"),
        ({"eval_batch_size": 0}, "eval_batch_size"),
        ({"lr": 0.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"train_per_experience": 0}, "train_per_experience"),
        ({"model": "rnn"}, "model"),
        ({"evaluate_on": "train"}, "evaluate_on"),
        ({"validation_fraction": 1.0}, "validation_fraction"),
        ({"validation_fraction": 0}, "validation_fraction"),
    ],
)
def test_invalid_values_are_errors(overrides, needle):
    with pytest.raises(C.ConfigError, match=needle):
        resolve(overrides=overrides)


def test_params_dataclass_validation_becomes_a_config_error():
    from dataclasses import dataclass

    @dataclass
    class Checked:
        k: int = 1

        def __post_init__(self):
            if self.k < 1:
                raise ValueError("k must be >= 1")

    with pytest.raises(C.ConfigError, match="k must be >= 1"):
        resolve(overrides={"k": 0}, params_cls=Checked, strategy="checked")


# --- overrides and spec files -------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("lr=1e-3", ("lr", 1e-3)),
        ("epochs=3", ("epochs", 3)),
        ("lr=1", ("lr", 1)),  # an int; resolve() turns it into a float
        ("hidden=[100, 100]", ("hidden", [100, 100])),
        ("hidden=[]", ("hidden", [])),
        ('mode="online"', ("mode", "online")),
        ("model=cnn", ("model", "cnn")),  # bare word: a string
        ("first_unpermuted=false", ("first_unpermuted", False)),
        (" ewc_lambda = 1e3 ", ("ewc_lambda", 1000.0)),
        ("name=a=b", ("name", "a=b")),  # split at the first '='
    ],
)
def test_parse_override(text, expected):
    key, value = C.parse_override(text)
    assert (key, value) == expected
    assert type(value) is type(expected[1])


@pytest.mark.parametrize("text", ["lr", "", "epochs 3"])
def test_parse_override_needs_an_equals_sign(text):
    with pytest.raises(C.ConfigError, match="key=value"):
        C.parse_override(text)


def test_parsed_overrides_resolve_with_the_right_types():
    overrides = dict(C.parse_override(t) for t in ["lr=1", "hidden=[8, 4]", "first_unpermuted=false", "epochs=2"])
    c = resolve(overrides=overrides)
    assert (c.lr, c.hidden, c.first_unpermuted, c.epochs) == (1.0, [8, 4], False, 2)
    with pytest.raises(C.ConfigError, match="epochs"):
        resolve(overrides=dict([C.parse_override("epochs=two")]))


def test_malformed_toml_is_a_config_error(tmp_path):
    (tmp_path / "naive.toml").write_text("lr = = 1e-3\n")
    with pytest.raises(C.ConfigError, match="malformed TOML") as e:
        C.load_spec("naive", tmp_path)
    assert str(tmp_path / "naive.toml") in str(e.value)


def test_load_spec_reads_the_given_folder(tmp_path):
    (tmp_path / "naive.toml").write_text('description = "x"\nlr = 0.5\n[benchmark.split-mnist.paper]\nepochs = 7\n')
    spec, path = C.load_spec("naive", tmp_path)
    assert path == tmp_path / "naive.toml"
    c = resolve(spec, benchmark="split-mnist", protocol="paper", params_cls=NoParams, strategy="naive")
    assert (c.lr, c.epochs, c.params) == (0.5, 7, {})


def test_specs_dir_precedence(tmp_path, monkeypatch):
    env_dir = tmp_path / "env"
    monkeypatch.setenv(C.SPECS_ENV, str(env_dir))
    assert C.specs_dir(tmp_path / "explicit") == tmp_path / "explicit"
    assert C.specs_dir() == env_dir
    monkeypatch.delenv(C.SPECS_ENV)
    monkeypatch.chdir(tmp_path)  # no ./strategies here: the checkout's folder
    assert C.specs_dir().resolve() == SPECS.resolve()
    (tmp_path / "strategies").mkdir()
    assert C.specs_dir() == tmp_path.joinpath("strategies").relative_to(tmp_path)


def test_params_clash_with_training_fields_is_caught():
    from dataclasses import dataclass

    @dataclass
    class Clash:
        lr: float = 1.0

    with pytest.raises(AssertionError):
        resolve(params_cls=Clash, strategy="clash")


def test_ewc_spec_file_overrides_per_benchmark():
    # The shipped ewc spec sets ewc_lambda at the top level and for permuted-mnist.
    raw = tomllib.loads((SPECS / "ewc.toml").read_text())
    spec, path = C.load_spec("ewc", SPECS)
    split = C.resolve(benchmark="split-mnist", strategy="ewc", seed=0, params_cls=EWCParams, spec=spec)
    perm = C.resolve(benchmark="permuted-mnist", strategy="ewc", seed=0, params_cls=EWCParams, spec=spec)
    assert split.params["ewc_lambda"] == raw["ewc_lambda"]
    assert perm.params["ewc_lambda"] == raw["benchmark"]["permuted-mnist"]["ewc_lambda"]

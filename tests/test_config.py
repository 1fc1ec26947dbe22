from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml

from vlacl.config import ClMetricsConfig, config_keys, config_to_dict, dump_config, help_for, resolve_config, setting
from vlacl.config.core import invalid
from vlacl.errors import ConfigError


@dataclass(frozen=True)
class OptimSection:
    lr: float = setting(1e-4, "Learning rate.", flag="--lr")
    steps: int = setting(100, "Optimizer steps.", flag="--steps")
    schedule: Literal["constant", "cosine"] = setting("cosine", "Learning-rate schedule.")
    warmup: int | None = setting(None, "Warmup steps; none means 5% of the steps.")


@dataclass(frozen=True)
class ToyConfig:
    name: str = setting("toy", "Run name.", flag="--name")
    seed: int = setting(0, "Random seed.", flag="--seed")
    mode: Literal["fast", "full"] = setting("fast", "How thorough the run is.", flag="--mode")
    verbose: bool = setting(False, "Log more.", flag="--verbose/--no-verbose")
    root: Path = setting(Path("data"), "Where the data lives.", flag="--root")
    tasks: tuple[str, ...] = setting(("pick", "place"), "Tasks in order.", flag="--tasks")
    optim: OptimSection = setting(OptimSection(), "Optimizer settings.")

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise invalid("seed", f"must be >= 0, got {self.seed}", ToyConfig)


TOY_KEYS = [
    "name",
    "seed",
    "mode",
    "verbose",
    "root",
    "tasks",
    "optim.lr",
    "optim.steps",
    "optim.schedule",
    "optim.warmup",
]


def write_yaml(path: Path, data: Any) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_defaults_without_any_layer() -> None:
    cfg = resolve_config(ToyConfig)
    assert cfg == ToyConfig()
    assert cfg.root == Path("data")
    assert cfg.tasks == ("pick", "place")
    assert cfg.optim == OptimSection(lr=1e-4, steps=100, schedule="cosine", warmup=None)


def test_config_keys_lists_nested_keys_in_field_order() -> None:
    assert config_keys(ToyConfig) == TOY_KEYS
    assert config_keys(ClMetricsConfig) == ["n_bootstrap", "confidence", "seed", "plot"]


@pytest.mark.parametrize(("in_file", "in_set", "in_flag"), list(itertools.product([False, True], repeat=3)))
def test_layer_precedence(tmp_path: Path, in_file: bool, in_set: bool, in_flag: bool) -> None:
    config_file = write_yaml(tmp_path / "cfg.yaml", {"optim": {"steps": 1}} if in_file else {})
    overrides = ["optim.steps=2"] if in_set else []
    flags = {"optim.steps": 3 if in_flag else None}
    expected = 3 if in_flag else 2 if in_set else 1 if in_file else 100
    cfg = resolve_config(ToyConfig, config_file=config_file, overrides=overrides, flags=flags)
    assert cfg.optim.steps == expected
    assert cfg.optim.lr == 1e-4


def test_layers_combine_per_key(tmp_path: Path) -> None:
    config_file = write_yaml(
        tmp_path / "cfg.yaml",
        {"name": "from-file", "seed": 1, "root": "runs/a", "optim": {"lr": 0.1, "schedule": "constant"}},
    )
    cfg = resolve_config(
        ToyConfig,
        config_file=config_file,
        overrides=["seed=2", "optim.lr=0.2", "seed=4", "verbose=true"],
        flags={"name": None, "verbose": False, "optim.steps": 7},
    )
    assert cfg == ToyConfig(
        name="from-file",
        seed=4,
        mode="fast",
        verbose=False,
        root=Path("runs/a"),
        tasks=("pick", "place"),
        optim=OptimSection(lr=0.2, steps=7, schedule="constant", warmup=None),
    )


def test_resolved_config_is_frozen() -> None:
    cfg = resolve_config(ToyConfig, overrides=["seed=5"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 6  # type: ignore[misc]
    assert cfg.seed == 5


@pytest.mark.parametrize(
    ("override", "key", "expected"),
    [
        ("verbose=yes", "verbose", True),
        ("verbose=off", "verbose", False),
        ("verbose=1", "verbose", True),
        ("mode=full", "mode", "full"),
        ("seed=7.0", "seed", 7),
        ("seed= 8", "seed", 8),
        ("name=12", "name", "12"),
        ("root=/abs/dir", "root", Path("/abs/dir")),
        ("tasks=a,b,c", "tasks", ("a", "b", "c")),
        ("tasks=[x, y]", "tasks", ("x", "y")),
        ("optim.lr=1e-3", "optim.lr", 0.001),
        ("optim.lr=2", "optim.lr", 2.0),
        ("optim.warmup=10", "optim.warmup", 10),
        ("optim.warmup=null", "optim.warmup", None),
        ("optim.warmup=none", "optim.warmup", None),
        ("optim.warmup=", "optim.warmup", None),
    ],
)
def test_set_values_are_coerced_to_the_field_type(override: str, key: str, expected: Any) -> None:
    cfg: Any = resolve_config(ToyConfig, overrides=[override])
    for part in key.split("."):
        cfg = getattr(cfg, part)
    assert cfg == expected
    assert type(cfg) is type(expected)


def test_file_values_are_coerced_to_the_field_type(tmp_path: Path) -> None:
    config_file = write_yaml(
        tmp_path / "cfg.yaml",
        {"root": "x/y", "tasks": ["only"], "seed": "3", "optim": {"warmup": None, "lr": 1, "steps": 4.0}},
    )
    cfg = resolve_config(ToyConfig, config_file=config_file)
    assert cfg.root == Path("x/y")
    assert cfg.tasks == ("only",)
    assert cfg.seed == 3
    assert cfg.optim.warmup is None
    assert cfg.optim.lr == 1.0
    assert isinstance(cfg.optim.lr, float)
    assert cfg.optim.steps == 4
    assert isinstance(cfg.optim.steps, int)


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("seed=abc", "invalid value 'abc' for `seed` (from --set seed=abc): expected an integer"),
        ("seed=1.5", "invalid value 1.5 for `seed` (from --set seed=1.5): expected an integer"),
        ("seed=true", "invalid value True for `seed` (from --set seed=true): expected an integer"),
        ("verbose=maybe", "invalid value 'maybe' for `verbose` (from --set verbose=maybe): expected true or false"),
        ("mode=slow", "invalid value 'slow' for `mode` (from --set mode=slow): expected one of 'fast', 'full'"),
        ("optim.lr=fast", "invalid value 'fast' for `optim.lr` (from --set optim.lr=fast): expected a number"),
        ("optim.lr=false", "for `optim.lr` (from --set optim.lr=false): expected a number"),
        ("optim.warmup=many", "for `optim.warmup` (from --set optim.warmup=many): expected int or null"),
        ("optim.schedule=linear", "for `optim.schedule` (from --set optim.schedule=linear): expected one of"),
    ],
)
def test_set_type_errors_name_key_and_source(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        resolve_config(ToyConfig, overrides=[override])
    assert fragment in str(info.value)


def test_file_type_error_names_key_and_file(tmp_path: Path) -> None:
    config_file = write_yaml(tmp_path / "cfg.yaml", {"optim": {"steps": "many"}})
    with pytest.raises(ConfigError) as info:
        resolve_config(ToyConfig, config_file=config_file)
    assert str(info.value) == (
        f"invalid value 'many' for `optim.steps` (from config file {config_file}): expected an integer"
    )


def test_flag_type_error_names_the_flag() -> None:
    with pytest.raises(ConfigError) as info:
        resolve_config(ToyConfig, flags={"optim.lr": "fast"})
    assert str(info.value) == "invalid value 'fast' for `optim.lr` (from --lr): expected a number"


def test_flag_without_declared_flag_falls_back_to_the_key() -> None:
    with pytest.raises(ConfigError) as info:
        resolve_config(ToyConfig, flags={"optim.schedule": "linear"})
    assert "for `optim.schedule` (from optim.schedule): expected one of 'constant', 'cosine'" in str(info.value)


def test_missing_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        resolve_config(ToyConfig, config_file=missing)
    assert str(info.value) == f"config file {missing} does not exist: check the path given to --config"


def test_config_file_that_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        resolve_config(ToyConfig, config_file=tmp_path)


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    config_file = tmp_path / "cfg.yaml"
    config_file.write_text("seed: 1\nname: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        resolve_config(ToyConfig, config_file=config_file)
    message = str(info.value)
    assert message.startswith(f"config file {config_file} is not valid YAML at line ")
    assert message.endswith(": fix the syntax")


@pytest.mark.parametrize(("text", "type_name"), [("- 1\n- 2\n", "list"), ("3\n", "int"), ("just text\n", "str")])
def test_non_mapping_config_file(tmp_path: Path, text: str, type_name: str) -> None:
    config_file = tmp_path / "cfg.yaml"
    config_file.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        resolve_config(ToyConfig, config_file=config_file)
    assert str(info.value) == f"config file {config_file} must hold a mapping of settings, got a {type_name}"


def test_empty_config_file_gives_defaults(tmp_path: Path) -> None:
    config_file = tmp_path / "cfg.yaml"
    config_file.write_text("# nothing set\n", encoding="utf-8")
    assert resolve_config(ToyConfig, config_file=config_file) == ToyConfig()


@pytest.mark.parametrize(
    ("data", "key", "suggestion"),
    [({"sed": 1}, "sed", "seed"), ({"optim": {"lrr": 0.1}}, "optim.lrr", "optim.lr")],
)
def test_unknown_key_in_file_suggests_a_key(tmp_path: Path, data: dict[str, Any], key: str, suggestion: str) -> None:
    config_file = write_yaml(tmp_path / "cfg.yaml", data)
    with pytest.raises(ConfigError) as info:
        resolve_config(ToyConfig, config_file=config_file)
    assert str(info.value) == f"unknown config key `{key}` in {config_file}: did you mean `{suggestion}`?"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.stpes=3", "unknown config key `optim.stpes` in --set: did you mean `optim.steps`?"),
        ("verbos=1", "unknown config key `verbos` in --set: did you mean `verbose`?"),
        ("seed.x=1", "unknown config key `seed.x` in --set: did you mean `seed`?"),
        ("zzzzzz=1", "unknown config key `zzzzzz` in --set: known keys: " + ", ".join(TOY_KEYS)),
        ("optim=3", "config key `optim` in --set is a section, not a setting: set one of its keys, e.g. `optim.lr`"),
        ("seed", "invalid --set 'seed': expected KEY=VALUE, e.g. --set seed=3"),
        ("=3", "invalid --set '=3': expected KEY=VALUE, e.g. --set seed=3"),
        (" =3", "invalid --set ' =3': expected KEY=VALUE, e.g. --set seed=3"),
        ("", "invalid --set '': expected KEY=VALUE, e.g. --set seed=3"),
        ("seed=-1", "invalid config value `seed` (--seed): must be >= 0, got -1"),
    ],
)
def test_bad_set_override_gets_one_clear_error(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        resolve_config(ToyConfig, overrides=[override])
    assert str(info.value) == message


def test_section_used_as_a_setting_in_file(tmp_path: Path) -> None:
    config_file = write_yaml(tmp_path / "cfg.yaml", {"optim": 3})
    with pytest.raises(ConfigError) as info:
        resolve_config(ToyConfig, config_file=config_file)
    assert str(info.value) == f"config key `optim` in {config_file} must be a mapping of settings, got 3"


@pytest.mark.parametrize(
    ("overrides", "flags", "message"),
    [
        (["n_bootstrap=-1"], {}, "invalid config value `n_bootstrap` (--bootstrap): must be in [0, 100000], got -1"),
        ([], {"n_bootstrap": -5}, "invalid config value `n_bootstrap` (--bootstrap): must be in [0, 100000], got -5"),
        (["confidence=1"], {}, "invalid config value `confidence` (--confidence): must be in (0, 1), got 1.0"),
        ([], {"confidence": 0.0}, "invalid config value `confidence` (--confidence): must be in (0, 1), got 0.0"),
        ([], {"seed": -1}, "invalid config value `seed` (--seed): must be >= 0, got -1"),
    ],
)
def test_cl_metrics_validation_names_the_flag(overrides: list[str], flags: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        resolve_config(ClMetricsConfig, overrides=overrides, flags=flags)
    assert str(info.value) == message


def test_cl_metrics_validation_on_direct_construction() -> None:
    with pytest.raises(ConfigError, match=r"`confidence` \(--confidence\): must be in \(0, 1\), got 1.5"):
        ClMetricsConfig(confidence=1.5)


def test_cl_metrics_accepts_edge_values() -> None:
    cfg = resolve_config(ClMetricsConfig, overrides=["n_bootstrap=0", "confidence=0.5", "plot=no"])
    assert cfg == ClMetricsConfig(n_bootstrap=0, confidence=0.5, seed=0, plot=False)


def test_invalid_without_class_or_flag() -> None:
    assert str(invalid("a.b", "too big")) == "invalid config value `a.b`: too big"
    assert str(invalid("nope", "bad", ClMetricsConfig)) == "invalid config value `nope`: bad"
    assert str(invalid("optim.schedule", "bad", ToyConfig)) == "invalid config value `optim.schedule`: bad"
    assert str(invalid("optim.lr", "bad", ToyConfig)) == "invalid config value `optim.lr` (--lr): bad"


def test_config_to_dict_gives_plain_types() -> None:
    cfg = ToyConfig(root=Path("a/b"), tasks=("t1",), optim=OptimSection(warmup=3))
    assert config_to_dict(cfg) == {
        "name": "toy",
        "seed": 0,
        "mode": "fast",
        "verbose": False,
        "root": "a/b",
        "tasks": ["t1"],
        "optim": {"lr": 1e-4, "steps": 100, "schedule": "cosine", "warmup": 3},
    }


def test_config_to_dict_refuses_a_class() -> None:
    with pytest.raises(TypeError, match="expected a dataclass instance, got type"):
        config_to_dict(ToyConfig)


def test_dump_config_exact_text_in_field_order() -> None:
    assert dump_config(ClMetricsConfig()) == "n_bootstrap: 1000\nconfidence: 0.95\nseed: 0\nplot: true\n"
    assert list(yaml.safe_load(dump_config(ToyConfig()))) == [
        "name",
        "seed",
        "mode",
        "verbose",
        "root",
        "tasks",
        "optim",
    ]


@pytest.mark.parametrize(
    "cfg",
    [
        ToyConfig(),
        ToyConfig(
            name="1.10",
            seed=3,
            mode="full",
            verbose=True,
            root=Path("runs/seq a"),
            tasks=("yes", "null", "3"),
            optim=OptimSection(lr=1e-5, steps=5, schedule="constant", warmup=0),
        ),
        ToyConfig(tasks=(), optim=OptimSection(warmup=None)),
    ],
)
def test_dump_config_round_trips(tmp_path: Path, cfg: ToyConfig) -> None:
    text = dump_config(cfg)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(text, encoding="utf-8")
    again = resolve_config(ToyConfig, config_file=config_file)
    assert again == cfg
    assert dump_config(again) == text


def test_cl_metrics_dump_round_trips(tmp_path: Path) -> None:
    cfg = ClMetricsConfig(n_bootstrap=10, confidence=0.9, seed=4, plot=False)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(dump_config(cfg), encoding="utf-8")
    assert resolve_config(ClMetricsConfig, config_file=config_file) == cfg


def test_help_for_includes_the_default() -> None:
    assert help_for(ClMetricsConfig, "n_bootstrap").startswith("Bootstrap resamples for the confidence intervals")
    assert help_for(ClMetricsConfig, "n_bootstrap").endswith("(default: 1000)")
    assert help_for(ClMetricsConfig, "plot") == "Write matrix.png, an annotated heatmap of each matrix. (default: True)"
    assert help_for(ToyConfig, "optim.lr") == "Learning rate. (default: 0.0001)"
    assert help_for(ToyConfig, "optim.warmup") == "Warmup steps; none means 5% of the steps. (default: none)"
    assert help_for(ToyConfig, "mode") == "How thorough the run is. (default: fast)"


def test_help_for_unknown_key() -> None:
    with pytest.raises(KeyError):
        help_for(ToyConfig, "optim.nope")


def test_a_binary_config_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "blob.yaml"
    path.write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(ConfigError) as info:
        resolve_config(ClMetricsConfig, config_file=path)
    assert str(info.value) == f"config file {path} is not UTF-8 text: --config takes a YAML file"

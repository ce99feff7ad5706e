"""Typed config loading: unknown keys, precedence, coercion, inheritance, round-trips, validation."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from pretrain.config_io import ConfigError, dump_config, load_config, save_config
from pretrain.schedules import ScheduleConfig


@dataclass(frozen=True)
class Source:
    path: Path
    weight: float = 1.0

    def validate(self) -> None:
        if self.weight <= 0:
            raise ValueError(f"weight must be > 0, got {self.weight}; drop the source instead")


@dataclass(frozen=True)
class ModelConfig:
    name: str = "vit_small"
    patch_size: Literal[14, 16] = 16
    n_registers: int = 0
    layerscale_init: float | None = 1e-5


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: float | None = 3.0
    target: Literal["centering", "sinkhorn"] = "centering"


@dataclass(frozen=True)
class DataConfig:
    sources: list[Source] = field(default_factory=list)
    local_crops: int = 8
    flip: bool = True
    loss_weights: dict[str, float] = field(default_factory=lambda: {"dino": 1.0})


@dataclass(frozen=True)
class GramConfig:
    weight: float = 2.0
    start_iter: int = 0


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: ModelConfig = field(default_factory=lambda: ModelConfig(name="vit_large"))
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    gram: GramConfig | None = None
    run_name: str = "run"
    output_dir: Path = Path("runs")
    seed: int = 0

    def validate(self) -> None:
        if self.gram is not None and self.optim.target != "sinkhorn":
            raise ValueError("gram anchoring needs optim.target=sinkhorn; set it or remove 'gram'")


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_without_file() -> None:
    assert load_config(TrainConfig, None, []) == TrainConfig()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"sead": 1}, "unknown config key 'sead'; did you mean 'seed'?"),
        ({"optim": {"lrr": 0.1}}, "unknown config key 'optim.lrr'; did you mean 'optim.lr'?"),
        ({"data": {"sources": [{"path": "a", "wieght": 2}]}}, "'data.sources[0].wieght'; did you mean"),
        ({"gram": {"weigth": 1.0}}, "unknown config key 'gram.weigth'; did you mean 'gram.weight'?"),
    ],
)
def test_unknown_key_in_file_names_path_and_suggestion(tmp_path: Path, data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(TrainConfig, _write(tmp_path / "c.yaml", data), [])


def test_unknown_key_in_override() -> None:
    with pytest.raises(ConfigError, match="unknown config key 'optim.lrr'; did you mean 'optim.lr'"):
        load_config(TrainConfig, None, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="'optim.lr' is a float, not a section"):
        load_config(TrainConfig, None, ["optim.lr.x=1"])


def test_precedence_override_over_file_over_defaults(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.yaml", {"optim": {"lr": 0.01, "clip_grad": 1.0}, "seed": 3})
    config = load_config(TrainConfig, path, ["optim.lr=1e-3", "model.name=vit_base"])
    assert config.optim.lr == 1e-3  # CLI beats file
    assert config.optim.clip_grad == 1.0 and config.seed == 3  # file beats defaults
    assert config.optim.betas == (0.9, 0.999) and config.model.n_registers == 0  # defaults remain
    assert config.model.name == "vit_base"


def test_partial_section_refines_the_fields_own_default() -> None:
    config = load_config(TrainConfig, None, ["teacher.n_registers=4"])
    assert config.teacher == ModelConfig(name="vit_large", n_registers=4)


def test_override_coercion() -> None:
    config = load_config(
        TrainConfig,
        None,
        [
            "optim.betas=[0.9, 0.99]",
            "optim.clip_grad=null",
            "schedule.epochs=1e2",  # YAML 1.1 keeps '1e2' a string; ints accept integral numbers
            "model.layerscale_init=1",
            "data.flip=false",
            "run_name=2024",  # a str field keeps the text as typed
            "output_dir=/tmp/x",
            "data.sources=[{path: a.parquet, weight: 2}, {path: b.parquet}]",
            "data.loss_weights.ibot=0.5",
            "gram.weight=1.5",
            "optim.target=sinkhorn",
        ],
    )
    assert config.optim.betas == (0.9, 0.99)
    assert config.optim.clip_grad is None
    assert config.schedule.epochs == 100 and isinstance(config.schedule.epochs, int)
    assert config.model.layerscale_init == 1.0 and isinstance(config.model.layerscale_init, float)
    assert config.data.flip is False
    assert config.run_name == "2024"
    assert config.output_dir == Path("/tmp/x")
    assert config.data.sources == [Source(Path("a.parquet"), 2.0), Source(Path("b.parquet"))]
    assert config.data.loss_weights == {"dino": 1.0, "ibot": 0.5}
    assert config.gram == GramConfig(weight=1.5)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("schedule.epochs=ten", r"'schedule.epochs' expects int, got 'ten' \(str\)"),
        ("schedule.epochs=2.5", r"'schedule.epochs' expects int, got 2.5"),
        ("seed=true", r"'seed' expects int, got True \(bool\)"),
        ("data.flip=1", r"'data.flip' expects bool, got 1 \(int\)"),
        ("optim.betas=[0.9]", r"'optim.betas' expects tuple\[float, float\], got \[0.9\]"),
        ("optim.betas=[0.9, x]", r"'optim.betas\[1\]' expects float, got 'x'"),
        ("optim.lr=null", "'optim.lr' expects float, got None"),
        ("data.sources=[{weight: 2}]", r"'data.sources\[0\].path' is required"),
        ("data.sources=[{path: a, weight: 0}]", r"'data.sources\[0\]'.*weight must be > 0"),
    ],
)
def test_type_errors_name_key_type_and_value(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(TrainConfig, None, [override])


def test_literal_error_lists_options(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'optim.target' must be one of 'centering', 'sinkhorn'; got 'sk'"):
        load_config(TrainConfig, None, ["optim.target=sk"])
    with pytest.raises(ConfigError, match="'model.patch_size' must be one of 14, 16; got 15"):
        load_config(TrainConfig, _write(tmp_path / "c.yaml", {"model": {"patch_size": 15}}), [])


def test_override_without_equals_gives_example() -> None:
    with pytest.raises(ConfigError, match="must be key=value.*e.g. optim.lr=1e-3"):
        load_config(TrainConfig, None, ["optim.lr"])


def test_base_inheritance(tmp_path: Path) -> None:
    (tmp_path / "base").mkdir()
    _write(tmp_path / "base" / "v3.yaml", {"model": {"name": "vit_large", "n_registers": 4}, "seed": 1})
    _write(tmp_path / "v3_mid.yaml", {"base": "base/v3.yaml", "model": {"patch_size": 14}, "seed": 2})
    child = _write(tmp_path / "v3_tiny.yaml", {"base": "v3_mid.yaml", "model": {"name": "vit_test"}})
    config = load_config(TrainConfig, child, ["seed=5"])
    assert config.model == ModelConfig(name="vit_test", patch_size=14, n_registers=4)
    assert config.seed == 5
    assert load_config(TrainConfig, child, []).seed == 2


def test_base_cycle_and_missing_file(tmp_path: Path) -> None:
    _write(tmp_path / "a.yaml", {"base": "b.yaml"})
    _write(tmp_path / "b.yaml", {"base": "a.yaml"})
    with pytest.raises(ConfigError, match="cycle"):
        load_config(TrainConfig, tmp_path / "a.yaml", [])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(TrainConfig, tmp_path / "missing.yaml", [])


def test_save_load_round_trip(tmp_path: Path) -> None:
    config = load_config(
        TrainConfig,
        None,
        ["data.sources=[{path: a.parquet, weight: 0.5}]", "gram.start_iter=10", "optim.target=sinkhorn"],
    )
    path = tmp_path / "ckpt" / "config.yaml"
    save_config(config, path)
    assert load_config(TrainConfig, path, []) == config
    dumped = dump_config(config)
    assert dumped["output_dir"] == "runs" and dumped["optim"]["betas"] == [0.9, 0.999]
    assert yaml.safe_load(path.read_text()) == dumped


def test_validate_hooks_run_with_path() -> None:
    with pytest.raises(
        ConfigError, match="invalid config '<root>': gram anchoring needs optim.target=sinkhorn"
    ):
        load_config(TrainConfig, None, ["gram.weight=1"])
    with pytest.raises(ConfigError, match="invalid config 'schedule'.*must not exceed epochs"):
        load_config(TrainConfig, None, ["schedule.epochs=5", "schedule.warmup_epochs=10"])

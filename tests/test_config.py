import dataclasses

import pytest

from posttrain.config import ConfigError, LoRAConfig, ModelConfig, TrainConfig, field, load_config


@dataclasses.dataclass
class StageConfig:
    model: ModelConfig = field(default_factory=ModelConfig, help="model")
    lora: LoRAConfig = field(default_factory=LoRAConfig, help="adapters")
    train: TrainConfig = field(default_factory=TrainConfig, help="optimisation")
    k: int = field(4, help="samples per prompt")
    name: str | None = field(None, help="optional name")


def _write(tmp_path, text):
    path = tmp_path / "stage.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides_build_nested_dataclasses(tmp_path):
    path = _write(tmp_path, "model:\n  path: tiny\ntrain:\n  learning_rate: 1.0e-5\n  max_steps: 3\nk: 8\n")
    cfg = load_config(StageConfig, path, ["train.max_steps=7", "lora.target_modules=[q_proj,v_proj]", "name=x"])
    assert cfg.model.path == "tiny"
    assert cfg.train.learning_rate == 1e-5 and cfg.train.max_steps == 7
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.k == 8 and cfg.name == "x"


def test_int_is_accepted_for_a_float_field(tmp_path):
    cfg = load_config(StageConfig, _write(tmp_path, "train:\n  learning_rate: 1\n"))
    assert cfg.train.learning_rate == 1.0 and isinstance(cfg.train.learning_rate, float)


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        ("modle:\n  path: x\n", [], r"stage.yaml: modle: unknown key \(did you mean model\?\)"),
        ("train:\n  learning_rat: 1\n", [], r"train.learning_rat: unknown key \(did you mean train.learning_rate\?\)"),
        ("k: four\n", [], r"k: expected int, got str 'four'"),
        ("k: true\n", [], r"k: expected int, got bool"),
        ("train:\n  batch_size: 0\n", [], r"train.batch_size: 0 is outside"),
        ("model:\n  dtype: fp8\n", [], r"model.dtype: 'fp8' is not one of"),
        ("lora: 3\n", [], r"lora: expected a mapping"),
        ("- a\n- b\n", [], r"top level must be a mapping"),
        ("k: [1\n", [], r"not valid YAML"),
        ("", ["k"], r"override must look like key=value"),
    ],
)
def test_bad_config_fails_at_load_naming_the_key(tmp_path, text, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(StageConfig, _write(tmp_path, text), overrides)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(StageConfig, tmp_path / "nope.yaml")


def test_exponent_without_a_dot_is_a_float(tmp_path):
    cfg = load_config(StageConfig, _write(tmp_path, "train:\n  learning_rate: 1e-5\n"), ["train.weight_decay=1e-2"])
    assert cfg.train.learning_rate == 1e-5 and cfg.train.weight_decay == 0.01

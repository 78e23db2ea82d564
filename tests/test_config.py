"""The run config: defaults, YAML, `--set` overrides and the messages for every mistake."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kneegen.config import (
    DiffusionConfig,
    ModelConfig,
    RunConfig,
    SampleConfig,
    TrainConfig,
    from_dict,
    load_config,
    parse_override,
    save_config,
    to_dict,
)
from kneegen.engine.network import network_settings
from kneegen.engine.plugins import resolve_plugins
from kneegen.engine.unet import UNetConfig
from kneegen.errors import KneegenError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_defaults_without_a_file():
    cfg = load_config()
    assert cfg == RunConfig()
    assert cfg.data == "data/prepared"
    assert cfg.device == "auto" and cfg.precision == "auto"
    assert cfg.model == ModelConfig("unet", {})
    assert network_settings(cfg.model)[1] == UNetConfig(64, [1, 2, 2], 2, [2], 1, 0.0)
    assert cfg.diffusion == DiffusionConfig(1000, "cosine", "v", "l2")
    assert cfg.train.epochs == 50 and cfg.train.batch_size == 32 and cfg.train.lr == 2e-4
    assert cfg.train.ema_decay == 0.999 and cfg.train.val_timesteps == 10
    assert cfg.sample == SampleConfig("dpm++2m", 25, 0.0, 16)


def test_defaults_are_not_shared_between_configs():
    a, b = load_config(), load_config()
    a.model.sections["unet"] = {"channels": 8}
    assert b.model.sections == {}


def test_yaml_file_overrides_only_what_it_names(tmp_path):
    cfg = load_config(
        write(
            tmp_path,
            "train:\n  epochs: 7\n  lr: 0.001\nmodel:\n  unet:\n    channel_mults: [1, 2]\n    attention_levels: [1]\n",
        )
    )
    assert cfg.train.epochs == 7
    assert cfg.train.lr == 0.001
    unet = network_settings(cfg.model)[1]
    assert unet.channel_mults == [1, 2]
    assert cfg.train.batch_size == TrainConfig().batch_size
    assert unet.channels == UNetConfig().channels
    assert cfg.diffusion == DiffusionConfig()


def test_flat_unet_keys_of_configs_written_before_sections_read_as_the_unet_section(tmp_path):
    cfg = load_config(write(tmp_path, "model:\n  arch: unet\n  channels: 16\n  patch_size: 2\n"))
    assert cfg.model == ModelConfig("unet", {"unet": {"channels": 16, "patch_size": 2}})
    assert load_config(None, {"model.channels": 8}).model.sections == {"unet": {"channels": 8}}


def test_a_model_key_that_is_no_section_is_refused_naming_where_it_goes():
    with pytest.raises(KneegenError, match=r"model\.width.*model\.unet\.width"):
        load_config(None, {"model.width": 8})


def test_empty_yaml_file_gives_the_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == RunConfig()


def test_set_overrides_beat_the_yaml_file(tmp_path):
    path = write(tmp_path, "train:\n  lr: 0.001\n  epochs: 3\n")
    overrides = dict(
        parse_override(text) for text in ["train.lr=3e-4", "model.unet.channel_mults=[1, 1, 2]", "device=cpu"]
    )
    cfg = load_config(path, overrides)
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == 3e-4
    assert cfg.train.epochs == 3
    assert cfg.model.sections["unet"]["channel_mults"] == [1, 1, 2]
    assert cfg.device == "cpu"


@pytest.mark.parametrize(
    "text, key, value",
    [
        ("train.epochs=12", "train.epochs", 12),
        ("train.lr=0.5", "train.lr", 0.5),
        (" sample.sampler = ddpm", "sample.sampler", "ddpm"),
        ("model.attention_levels=[0, 1]", "model.attention_levels", [0, 1]),
        ("data=a=b", "data", "a=b"),
    ],
)
def test_parse_override_reads_the_value_as_yaml(text, key, value):
    assert parse_override(text) == (key, value)


def test_set_lr_in_exponent_notation_becomes_a_float():
    cfg = load_config(None, dict([parse_override("train.lr=3e-4")]))
    assert cfg.train.lr == pytest.approx(3e-4, rel=0, abs=0)
    assert type(cfg.train.lr) is float


@pytest.mark.parametrize("text", ["train.lr", "=3", "  =3"])
def test_override_without_key_or_equals_is_refused(text):
    with pytest.raises(KneegenError, match="KEY=VALUE"):
        parse_override(text)


def test_unknown_key_is_named_with_the_closest_known_key(tmp_path):
    with pytest.raises(KneegenError) as info:
        load_config(write(tmp_path, "train:\n  epoch: 3\n"))
    message = str(info.value)
    assert "'train.epoch'" in message
    assert "did you mean 'train.epochs'?" in message
    assert str(tmp_path / "run.yaml") in message


def test_unknown_top_level_key_suggests_the_section():
    with pytest.raises(KneegenError, match=r"unknown config key 'modle'; did you mean 'model'\?"):
        load_config(None, {"modle.channels": 8})


def test_unknown_key_without_a_close_match_lists_the_known_keys():
    with pytest.raises(KneegenError) as info:
        load_config(None, {"train.lerning_rate": 0.1})
    message = str(info.value)
    assert "'train.lerning_rate'" in message
    assert "known keys:" in message and "lr" in message and "epochs" in message


def test_wrong_type_names_the_key_and_the_type(tmp_path):
    with pytest.raises(KneegenError) as info:
        load_config(write(tmp_path, 'train:\n  epochs: "ten"\n'))
    message = str(info.value)
    assert "train.epochs" in message and "int" in message and "'ten'" in message


@pytest.mark.parametrize(
    "override, key",
    [
        ({"train.epochs": 2.5}, "train.epochs"),
        ({"train.epochs": True}, "train.epochs"),  # a bool is not an int here
        ({"train.lr": "fast"}, "train.lr"),
        ({"model.unet.channel_mults": 2}, "model.unet.channel_mults"),
        ({"model.unet.channel_mults": [1, "x"]}, "model.unet.channel_mults"),
        ({"model.arch": 3}, "model.arch"),
        ({"data": 3}, "data"),
        ({"train": 5}, "train"),
    ],
)
def test_wrong_types_are_refused_naming_the_key(override, key):
    with pytest.raises(KneegenError, match=key.replace(".", r"\.")):
        resolve_plugins(load_config(None, override), "test")


@pytest.mark.parametrize(
    "override, key",
    [
        ({"train.lr": "nan"}, "train.lr"),
        ({"train.lr": float("nan")}, "train.lr"),
        ({"train.grad_clip": float("inf")}, "train.grad_clip"),
        ({"sample.autoguidance": "inf"}, "sample.autoguidance"),  # bounded keys: no infinity either
        ({"sample.autoguidance_sigma_max": "-inf"}, "sample.autoguidance_sigma_max"),
    ],
)
def test_non_finite_numbers_are_refused_naming_the_key(override, key):
    with pytest.raises(KneegenError, match=f"{key.replace('.', r'.')} = .* is not a finite number"):
        load_config(None, override)


def test_infinity_where_it_means_no_limit_survives_saving(tmp_path):
    cfg = load_config(None, {"sample.autoguidance_sigma_max": "inf"})
    assert cfg.sample.autoguidance_sigma_max == float("inf")
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_literal_violation_lists_the_choices(tmp_path):
    with pytest.raises(KneegenError) as info:
        load_config(write(tmp_path, "diffusion:\n  schedule: quadratic\n"))
    message = str(info.value)
    assert "diffusion.schedule" in message and "'quadratic'" in message
    assert "linear, cosine" in message


@pytest.mark.parametrize(
    "key, choices",
    [
        ("model.arch", "seed, unet"),
        ("sample.sampler", "ddim, ddpm"),
        ("diffusion.prediction", "eps, v"),
        ("device", "auto, cpu, cuda, mps"),
    ],
)
def test_every_choice_lists_its_choices(key, choices):
    """Plugin choices (network, sampler) are checked once the registries are loaded."""
    with pytest.raises(KneegenError, match=choices) as info:
        resolve_plugins(load_config(None, {key: "nonsense"}), "test")
    assert key in str(info.value)


def test_exponent_string_in_yaml_becomes_a_float(tmp_path):
    # PyYAML reads `1e-3` (no dot) as a string; the config must still take it as a float.
    assert yaml.safe_load("lr: 1e-3")["lr"] == "1e-3"
    cfg = load_config(write(tmp_path, "train:\n  lr: 1e-3\n  weight_decay: 5e-2\n  grad_clip: 2\n"))
    assert cfg.train.lr == 1e-3 and type(cfg.train.lr) is float
    assert cfg.train.weight_decay == 0.05
    assert cfg.train.grad_clip == 2.0 and type(cfg.train.grad_clip) is float


def test_yaml_that_is_not_a_mapping_is_refused(tmp_path):
    with pytest.raises(KneegenError, match="mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_invalid_yaml_is_refused_naming_the_file(tmp_path):
    path = write(tmp_path, "train: [1, 2\n")
    with pytest.raises(KneegenError, match="not valid YAML") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(KneegenError, match="nowhere.yaml"):
        load_config(tmp_path / "nowhere.yaml")


def test_override_into_a_value_is_refused():
    with pytest.raises(KneegenError, match="'data' is a value"):
        load_config(None, {"data": "x", "data.deeper": 1})


def test_saved_config_loads_back_equal(tmp_path):
    cfg = load_config(None, {"train.lr": 1e-3, "model.arch": "seed", "sample.eta": 0.5})
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert from_dict(RunConfig, to_dict(cfg), "checkpoint", prefix="") == cfg

"""Tests of pipeline.config: TOML loading, --set overrides, validation errors, frozen configs,
and the per-stage schedules (ε, layers, LR, ReLU-stability weight) against the reference tables
(docs/colt-reference.md §1.5-1.9)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pipeline.config import (
    ConfigError,
    DataConfig,
    TrainConfig,
    apply_overrides,
    from_dict,
    load_train_config,
    parse_override,
    to_dict,
)

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "studies" / "quickstart.toml"


# ---------------------------------------------------------------------------------------------
# Loading and overrides


def test_quickstart_toml_loads() -> None:
    cfg = load_train_config(QUICKSTART)
    assert isinstance(cfg, TrainConfig) and isinstance(cfg.data, DataConfig)
    assert cfg.net == "convmed_1_1_32"
    assert cfg.eps == 0.1 and isinstance(cfg.eps, float)
    assert cfg.latent_layers == (-1, 2, 4)  # TOML list -> tuple
    assert cfg.epochs_per_stage == 6 and cfg.mix_epochs == 2 and cfg.batch_size == 50
    assert cfg.lr == 0.05 and cfg.lr_layer_dec == 0.75 and cfg.lr_step == 2
    assert cfg.bounds == "cauchy" and cfg.seed == 100
    assert cfg.data.dataset == "digits" and cfg.data.n_valid == 300
    # Keys not in the file keep their defaults.
    assert cfg.momentum == TrainConfig().momentum
    assert cfg.data.split_seed == DataConfig().split_seed
    assert cfg.num_stages == 3


def test_overrides_are_applied() -> None:
    cfg = load_train_config(QUICKSTART, ["batch_size=64", "data.n_valid=100",
                                         "latent_layers=[-1,2]", "bounds=exact"])
    assert cfg.batch_size == 64
    assert cfg.data.n_valid == 100
    assert cfg.data.dataset == "digits"  # the rest of the nested table survives
    assert cfg.latent_layers == (-1, 2) and cfg.num_stages == 2
    assert cfg.bounds == "exact"
    # The file's other values are untouched.
    assert cfg.net == "convmed_1_1_32" and cfg.eps == 0.1


def test_override_int_for_float_and_bare_word() -> None:
    cfg = load_train_config(QUICKSTART, ["eps=1", "device=cpu", "net=fc_32_32"])
    assert cfg.eps == 1.0 and isinstance(cfg.eps, float)
    assert cfg.device == "cpu" and cfg.net == "fc_32_32"


def test_parse_override_and_apply_do_not_mutate() -> None:
    assert parse_override("data.n_valid = 100") == (["data", "n_valid"], 100)
    assert parse_override("latent_layers=[-1, 2]") == (["latent_layers"], [-1, 2])
    assert parse_override("bounds=exact") == (["bounds"], "exact")
    assert parse_override('bounds="exact"') == (["bounds"], "exact")
    original = {"data": {"dataset": "digits"}, "batch_size": 50}
    result = apply_overrides(original, ["data.n_valid=7", "batch_size=8"])
    assert result == {"data": {"dataset": "digits", "n_valid": 7}, "batch_size": 8}
    assert original == {"data": {"dataset": "digits"}, "batch_size": 50}


def test_override_without_equals_is_error() -> None:
    with pytest.raises(ConfigError, match="batch_size"):
        load_train_config(QUICKSTART, ["batch_size"])


def test_to_dict_round_trip() -> None:
    cfg = load_train_config(QUICKSTART, ["latent_layers=[-1,2]"])
    plain = to_dict(cfg)
    assert plain["latent_layers"] == [-1, 2] and plain["data"]["dataset"] == "digits"
    assert from_dict(TrainConfig, plain) == cfg


# ---------------------------------------------------------------------------------------------
# Errors


def test_unknown_key_names_it_and_lists_allowed() -> None:
    with pytest.raises(ConfigError) as info:
        load_train_config(QUICKSTART, ["batchsize=64"])
    msg = str(info.value)
    assert "batchsize" in msg
    assert "allowed" in msg
    for key in ("batch_size", "eps", "latent_layers", "epochs_per_stage", "lr_layer_dec"):
        assert key in msg
    assert "\n" not in msg


def test_unknown_nested_key_names_it_and_lists_allowed() -> None:
    with pytest.raises(ConfigError) as info:
        load_train_config(QUICKSTART, ["data.n_vaild=5"])
    msg = str(info.value)
    assert "data.n_vaild" in msg
    assert "data.n_valid" in msg and "data.dataset" in msg


def test_unknown_key_in_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[train]\nnet = "fc_32_32"\nmix_epoch = 3\n')
    with pytest.raises(ConfigError) as info:
        load_train_config(path)
    assert "mix_epoch" in str(info.value) and "mix_epochs" in str(info.value)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("override, key", [
    ('batch_size="64"', "batch_size"),      # string for int
    ("batch_size=true", "batch_size"),      # bool for int
    ("batch_size=64.0", "batch_size"),      # float for int
    ("epochs_per_stage=false", "epochs_per_stage"),
    ("eps=true", "eps"),                    # bool for float
    ('eps="0.1"', "eps"),
    ("deterministic=1", "deterministic"),   # int for bool
    ("latent_layers=3", "latent_layers"),   # scalar for list
    ('latent_layers=[-1,"2"]', "latent_layers"),
    ("data.n_valid=true", "data.n_valid"),
    ("data=3", "data"),                     # scalar for table
])
def test_wrong_type_is_error(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_train_config(QUICKSTART, [override])
    assert key in str(info.value)


@pytest.mark.parametrize("override, key", [
    ("eps=0", "eps"),
    ("eps=-0.1", "eps"),
    ("batch_size=0", "batch_size"),
    ("lr_layer_dec=1.5", "lr_layer_dec"),
    ("lr_layer_dec=0", "lr_layer_dec"),
    ("latent_layers=[2,4]", "latent_layers"),       # not starting at -1
    ("latent_layers=[]", "latent_layers"),
    ("latent_layers=[-1,4,2]", "latent_layers"),    # not increasing
    ("latent_layers=[-1,2,2]", "latent_layers"),    # not strictly increasing
    ("data.dataset=imagenet", "dataset"),
    ("net=resnet18", "net"),
    ("net=convmed_1_1", "net"),
    ("net=fc", "net"),
    ("bounds=crown", "bounds"),
    ("mix_epochs=-1", "mix_epochs"),
    ("epochs_per_stage=0", "epochs_per_stage"),
    ("momentum=1.0", "momentum"),
    ("lr_factor=2", "lr_factor"),
    ("data.n_valid=-1", "n_valid"),
])
def test_out_of_range_is_error(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_train_config(QUICKSTART, [override])
    msg = str(info.value)
    assert key in msg
    assert "\n" not in msg


def test_direct_construction_validates() -> None:
    with pytest.raises(ConfigError, match="eps"):
        TrainConfig(eps=0.0)
    with pytest.raises(ConfigError, match="dataset"):
        DataConfig(dataset="svhn")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="batch_size"):
        from_dict(TrainConfig, {"batch_size": 0})


def test_malformed_toml_names_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[train]\nnet = \"fc_32_32\nbatch_size = = 3\n")
    with pytest.raises(ConfigError) as info:
        load_train_config(path)
    assert str(path) in str(info.value)


def test_missing_file_names_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_train_config(path)
    assert str(path) in str(info.value)


def test_configs_are_frozen() -> None:
    cfg = load_train_config(QUICKSTART)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.batch_size = 64  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.data.n_valid = 10  # type: ignore[misc]
    assert isinstance(cfg.latent_layers, tuple)  # not a mutable list either
    assert hash(cfg) == hash(load_train_config(QUICKSTART))


# ---------------------------------------------------------------------------------------------
# Stage schedules (reference §1.6, §1.8, §1.9)

EPS_2 = 0.00784313725  # 2/255
EPS_8 = 0.031372549    # 8/255


def cifar_2_255() -> TrainConfig:
    return TrainConfig(net="convmedbig_1_2_4_250", eps=EPS_2, latent_layers=(-1, 2, 4, 6),
                       eps_initial_factor=1.05 * 1.1**3, eps_decay_factor=1.1,
                       lr=0.03, lr_layer_dec=0.75, relu_stable=0.005, relu_stable_factor=1.5)


def cifar_8_255() -> TrainConfig:
    return TrainConfig(net="convmed_2_4_250", eps=EPS_8, latent_layers=(-1, 2, 4),
                       eps_initial_factor=1.05 * 1.2**2, eps_decay_factor=1.2,
                       lr=0.03, lr_layer_dec=0.5)


def test_stage_eps_2_255_table() -> None:
    cfg = cifar_2_255()
    assert cfg.num_stages == 4
    expected_eps = [0.010961, 0.009965, 0.009059, 0.008235]
    expected_factor = [1.3976, 1.2705, 1.1550, 1.05]
    expected_255 = [2.795, 2.541, 2.310, 2.100]
    for s in range(4):
        assert cfg.stage_eps(s) == pytest.approx(expected_eps[s], abs=1e-6)
        assert cfg.stage_eps(s) / EPS_2 == pytest.approx(expected_factor[s], abs=1e-4)
        assert cfg.stage_eps(s) * 255 == pytest.approx(expected_255[s], abs=1e-3)
    # ε_j = decay^(S-1-j) · 1.05 · train_eps (reference §1.8), decreasing with depth.
    for s in range(4):
        assert cfg.stage_eps(s) == pytest.approx(1.1 ** (3 - s) * 1.05 * EPS_2, rel=1e-12)
    assert all(cfg.stage_eps(s) > cfg.stage_eps(s + 1) for s in range(3))


def test_stage_eps_8_255_table() -> None:
    cfg = cifar_8_255()
    expected_eps = [0.047435, 0.039529, 0.032941]
    expected_factor = [1.512, 1.26, 1.05]
    for s in range(3):
        assert cfg.stage_eps(s) == pytest.approx(expected_eps[s], abs=1e-6)
        assert cfg.stage_eps(s) / EPS_8 == pytest.approx(expected_factor[s], abs=1e-9)


def test_stage_layers() -> None:
    cfg = cifar_2_255()
    assert [cfg.stage_layers(s) for s in range(4)] == [
        (-2, -1, 2), (-1, 2, 4), (2, 4, 6), (4, 6, None)]
    one = TrainConfig(latent_layers=(-1,))
    assert one.num_stages == 1 and one.stage_layers(0) == (-2, -1, None)


def test_stage_lr() -> None:
    cfg = cifar_2_255()
    for s, lr in enumerate([0.03, 0.0225, 0.016875, 0.01265625]):
        assert cfg.stage_lr(s) == pytest.approx(lr, rel=1e-12)
    cfg8 = cifar_8_255()
    for s, lr in enumerate([0.03, 0.015, 0.0075]):
        assert cfg8.stage_lr(s) == pytest.approx(lr, rel=1e-12)


def test_stage_relu_stable() -> None:
    cfg = cifar_2_255()
    for s in range(4):
        assert cfg.stage_relu_stable(s) == pytest.approx(0.005 * 1.5**s, rel=1e-12)
    assert [round(cfg.stage_relu_stable(s), 8) for s in range(4)] == [
        0.005, 0.0075, 0.01125, 0.016875]

"""PretrainConfig: YAML + overrides, typed coercion, unknown keys, the resolved config.yaml."""

import pytest

from sept.errors import SeptError
from sept.training.config import PretrainConfig, load_config, save_resolved_config


def test_defaults_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method: byol\nlr: 0.3\nsteps: 50\nmax_samples: 1000\n")
    cfg = load_config(path, {"lr": 0.1, "batch_size": "16", "max_samples": None})
    assert cfg.method == "byol"  # from YAML
    assert cfg.lr == 0.1  # override beats YAML
    assert cfg.batch_size == 16 and isinstance(cfg.batch_size, int)  # command-line string coerced
    assert cfg.max_samples == 1000  # None override means "not given"
    assert cfg.arch == PretrainConfig().arch  # untouched default


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method: simclr\nlearning_rate: 0.1\n")
    with pytest.raises(SeptError, match=rf"unknown config key 'learning_rate' in {path}"):
        load_config(path)
    with pytest.raises(SeptError, match="unknown config key 'epochs' in overrides"):
        load_config(None, {"epochs": 3})


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"steps": "many"}, "config key 'steps' in overrides must be int"),
        ({"steps": 0}, "'steps' .* must be at least 1"),
        ({"lr": True}, "config key 'lr' in overrides must be float"),
        ({"method": "swav"}, "unknown SSL method 'swav'"),
        ({"arch": "vit_b"}, "config key 'arch'"),
        ({"optimizer": "adam"}, "config key 'optimizer'"),
        ({"lr_schedule": "step"}, "config key 'lr_schedule'"),
        ({"device": "tpu"}, "config key 'device'"),
        ({"min_image_size": 64}, "'min_image_size' .* exceeds image_size"),
        ({"momentum": 1.0}, "config key 'momentum'"),
        ({"precision": "fp16"}, "config key 'precision' in overrides must be auto, bf16 or fp32"),
        ({"run_ahead": -1}, "config key 'run_ahead' .* must be non-negative"),
    ],
)
def test_bad_values(overrides, message):
    with pytest.raises(SeptError, match=message):
        load_config(None, overrides)


def test_yaml_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(SeptError, match="must hold a mapping"):
        load_config(path)
    with pytest.raises(SeptError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, {"data": "pool/{0..3}.tar", "width": 8, "max_samples": 100, "temperature": 0.5})
    path = save_resolved_config(cfg, tmp_path / "run")
    assert path.endswith("run/config.yaml")
    assert load_config(path) == cfg


def test_fast_preset_turns_every_strategy_on_below_yaml_and_overrides(tmp_path):
    cfg = load_config(None, {"steps": 90}, preset="fast")
    assert (cfg.lr_schedule, cfg.progressive, cfg.hard_positives) == ("cyclic", True, True)
    assert cfg.cycle_steps == 30 and cfg.min_image_size == 24  # derived once, then saved
    path = tmp_path / "run.yaml"
    path.write_text("hard_positives: false\n")
    cfg = load_config(path, {"progressive": "false"}, preset="fast")
    assert (cfg.lr_schedule, cfg.progressive, cfg.hard_positives) == ("cyclic", False, False)
    with pytest.raises(SeptError, match="unknown preset 'slow'"):
        load_config(None, preset="slow")


def test_detcon_alias_and_resolved_values_round_trip(tmp_path):
    cfg = load_config(None, {"method": "detcon", "lr_schedule": "cyclic", "steps": 10})
    assert cfg.method == "detcon_s" and cfg.cycle_steps == 3
    assert load_config(save_resolved_config(cfg, tmp_path / "run")) == cfg


def test_precision_auto_is_bf16_on_gpus_only():
    import torch

    from sept.training.trainer import uses_bf16

    cpu = torch.device("cpu")
    assert uses_bf16("bf16", cpu) and not uses_bf16("fp32", cpu) and uses_bf16("auto", torch.device("cuda", 0))
    assert not uses_bf16("auto", cpu)  # even where the CPU has native bfloat16 (trainer.uses_bf16)
    assert not uses_bf16("fp32", torch.device("cuda", 0))


def test_data_loading_workers_follow_the_cpus_each_rank_is_given(tmp_path):
    from test_embed_pools import write_good_shard

    from sept.training.launcher import _prepared

    shard = str(tmp_path / "00000.tar")
    write_good_shard(shard, 4, seed=0)
    base = PretrainConfig(data=shard, out=str(tmp_path / "run"))
    assert base.num_workers is None
    assert _prepared(base, 0, cpus_per_task=6).num_workers == 5
    assert _prepared(base, 0, cpus_per_task=1).num_workers == 0
    explicit = PretrainConfig(data=shard, out=str(tmp_path / "run2"), num_workers=0)
    assert _prepared(explicit, 0, cpus_per_task=6).num_workers == 0  # a user's choice is kept

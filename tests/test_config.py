"""Config loading: every YAML in configs/ parses; every user mistake is one line naming key and value."""

from pathlib import Path

import pytest

from linformer_train.config import (
    ConfigError,
    check_batch_arithmetic,
    config_from_dict,
    load_config,
    save_config,
    k_schedule,
    upgrade_saved,
)

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads(path):
    cfg = load_config([path])
    assert len(k_schedule(cfg.model)) == cfg.model.num_layers


def test_configs_cover_the_documented_set():
    names = {p.name for p in CONFIGS}
    assert {"tiny.yaml", "base-512.yaml", "base-4096.yaml", "base-8192-layerwise.yaml",
            "base-512-full.yaml", "base-8192-zero3-offload.yaml", "base-512-to-8192.yaml"} <= names


def test_base_chain_and_overrides(tmp_path):
    (tmp_path / "a.yaml").write_text("model: {preset: tiny, max_seq_len: 256}\noptim: {lr: 1.0e-3}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nmodel: {k: 64}\n")
    cfg = load_config([tmp_path / "b.yaml"], ["optim.lr=5e-4", "model.num_layers=3"])
    assert (cfg.model.max_seq_len, cfg.model.k, cfg.optim.lr) == (256, 64, 5e-4)
    assert (cfg.model.hidden_size, cfg.model.num_layers) == (64, 3)  # preset, then override wins


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config([CONFIGS[0]], ["model.k=[16,8]", "model.preset=tiny"])
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config([tmp_path / "resolved.yaml"]) == cfg


ERRORS = [
    (["model.hidden_size=abc"], r"^config: model.hidden_size: Value 'abc' of type 'str' could not be converted to Integer$"),
    (["model.foo=1"], r"^config: model.foo: unknown key; ModelConfig takes preset, vocab_size, .*"),
    (["nosection.x=1"], r"^config: nosection: unknown key; Config takes model, data, optim, .*"),
    (["model.attention=sparse"], r"^model.attention='sparse' is not allowed; choose one of linformer, full, naive$"),
    (["model.sharing=rows"], r"^model.sharing='rows' is not allowed; choose one of none, headwise, kv, layerwise$"),
    (["model.preset=huge"], r"^model.preset='huge' is unknown; choose one of tiny, small, base, large$"),
    (["model.hidden_size=100", "model.num_heads=12"], r"^model.hidden_size=100 is not divisible by model.num_heads=12$"),
    (["model.k=1024", "model.max_seq_len=512"], r"^model.k for layer 0 is 1024 > model.max_seq_len=512; k must not exceed n$"),
    (["model.num_layers=3", "model.k=[64,32]"], r"^model.k has 2 values but model.num_layers=3; give one k per layer$"),
    (["model.k={first: 64}"], r"^model.k=\{'first': 64\} as a rule takes keys first, last"),
    (["model.projection=conv", "model.k=100"], r"needs n divisible by k, but max_seq_len=512 and k=100"),
    (["zero.stage=4"], r"^zero.stage=4 is not allowed; choose one of 0, 1, 2, 3$"),
    (["zero.offload_params=true", "zero.stage=2"], r"^zero.offload_params needs zero.stage=3 \(got 2\)$"),
    (["precision.zero_stage=2"], r"^config: precision.zero_stage has moved to zero.stage \(ZeRO has its own section\); "
                                 r"write zero.stage=2, or in YAML zero: \{stage: 2\}$"),
    (["precision.offload_optimizer=true"], r"^config: precision.offload_optimizer has moved to zero.offload_optimizer "),
    (["model.projection=mean", "model.sharing=kv"], r"^model.sharing=kv means nothing with projection=mean \(mean "
                                                    r"pooling has no weights to share\); leave model.sharing at its "
                                                    r"default, headwise$"),
    (["model.projection=mean", "model.sharing=layerwise"], r"^model.sharing=layerwise means nothing with projection=mean"),
    (["model.projection=conv", "model.sharing=none"], r"^model.sharing=none applies to learned projections"),
    (["data.source=files"], r"^data.paths is empty but data.source=files"),
    (["optim.lr=-1"], r"^optim.lr=-1.0 must be positive$"),
    (["train.micro_batch_size=0"], r"^train.micro_batch_size=0 must be positive$"),
    (["checkpoint.keep_last=0"], r"^checkpoint.keep_last=0 must be at least 1$"),
    (["optim"], r"^override 'optim' is not key=value"),
]


@pytest.mark.parametrize("overrides,pattern", ERRORS, ids=[" ".join(o) for o, _ in ERRORS])
def test_config_errors_are_one_line(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern) as info:
        load_config([], overrides)
    assert "\n" not in str(info.value)


def test_zero_keys_of_the_precision_section_are_refused_in_files_and_moved_in_checkpoints(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("precision:\n  dtype: bf16\n  zero_stage: 3\n  offload_params: true\n")
    with pytest.raises(ConfigError, match=r"^config: precision.zero_stage has moved to zero.stage .*zero: \{stage: 3\}$"):
        load_config([old])
    saved = {"precision": {"dtype": "bf16", "zero_stage": 3, "offload_params": True}, "model": {"k": 64}}
    upgraded = upgrade_saved(saved)
    assert upgraded == {"precision": {"dtype": "bf16"}, "zero": {"stage": 3, "offload_params": True},
                        "model": {"k": 64}}
    assert saved["precision"]["zero_stage"] == 3  # the caller's dict is left as it was
    cfg = config_from_dict(upgraded)
    assert (cfg.zero.stage, cfg.zero.offload_params, cfg.precision.dtype) == (3, True, "bf16")
    assert upgrade_saved({"zero": {"stage": 1}}) == {"zero": {"stage": 1}}


def test_mean_pooling_takes_the_default_sharing():
    assert load_config([], ["model.projection=mean", "model.k=128"]).model.sharing == "headwise"


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match=r"does not exist; pass an existing YAML to --config$"):
        load_config([tmp_path / "nope.yaml"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"is not valid YAML .*; fix the syntax$"):
        load_config([bad])
    loop = tmp_path / "loop.yaml"
    loop.write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match=r"`base:` loop"):
        load_config([loop])


def test_global_batch_arithmetic():
    cfg = load_config([], ["train.micro_batch_size=4", "train.grad_accum_steps=2", "train.global_batch_size=32"])
    assert check_batch_arithmetic(cfg.train, 4) == 32
    with pytest.raises(ConfigError, match=r"^train.global_batch_size=32 but micro_batch_size=4 x "
                                          r"grad_accum_steps=2 x 2 ranks = 16; change one of them$"):
        check_batch_arithmetic(cfg.train, 2)


def test_fine_tuning_configs_refuse_the_moved_keys_too():
    from linformer_train.finetune.config import load_finetune_config

    with pytest.raises(ConfigError, match=r"^config: precision.offload_params has moved to zero.offload_params "
                                          r"\(ZeRO has its own section\); write zero.offload_params=true"):
        load_finetune_config([], ["precision.offload_params=true"])

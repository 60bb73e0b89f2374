"""Config rules found by an audit: null sections via --set, eval sizes, seed range, ignored keys, run.name,
duplicate JSON keys, numeric strings via --set. Every error names the key, the value and what is allowed."""

import json
import logging

import pytest
from conftest import ROOT, run_in_process

from sdxl_ff.config import ConfigError, load_config

SHIPPED = ROOT / "config.json"


def error_of(path, *overrides) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    return str(info.value)


def test_set_creates_a_null_section_with_its_defaults():
    assert json.loads(SHIPPED.read_text())["training"]["lr_scheduler"] is None
    cfg = load_config(SHIPPED, ["training.lr_scheduler.type=cosine_decay"])
    s = cfg.training.lr_scheduler
    assert (s.type, s.warmup_steps, s.min_factor, s.cycle_steps, s.cycle_mult) == ("cosine_decay", 0, 0.0, None, 1.0)


def test_set_into_a_scalar_is_still_refused():
    assert "'num_steps' is not a section" in error_of(SHIPPED, "training.num_steps.x=1")


@pytest.mark.parametrize("key", ["height", "width"])
def test_eval_size_must_be_a_multiple_of_8(key):
    msg = error_of(SHIPPED, f"eval.{key}=1001")
    assert f"eval.{key}: 1001 is not a multiple of 8" in msg and "use e.g. 1000 or 1008" in msg
    assert "prompts_path" not in msg


def test_seed_range():
    msg = error_of(SHIPPED, "training.seed=100000000000000")
    assert "training.seed: 100000000000000 is out of range; allowed: >= 0 and < 4294967296" in msg
    assert load_config(SHIPPED, ["training.seed=4294967295"]).training.seed == 2**32 - 1


def test_largest_seed_trains(tmp_path, sample_dir):
    from conftest import tiny_overrides
    proc = run_in_process(*tiny_overrides(tmp_path, sample_dir, steps=1, **{"training.seed": str(2**32 - 1)}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "seed: 4294967295" in proc.stderr


def test_final_eval_has_no_period():
    msg = error_of(SHIPPED, "eval.final.every_n_steps=100")
    assert "eval.final.every_n_steps: 100, but the final eval runs once" in msg


@pytest.mark.parametrize("key, value", [("cycle_steps", "400"), ("cycle_mult", "2.0")])
def test_cycle_keys_need_restarts(key, value):
    msg = error_of(SHIPPED, "training.lr_scheduler.type=cosine_decay", f"training.lr_scheduler.{key}={value}")
    assert f"training.lr_scheduler.{key}: {value} only applies to type \"cosine_restarts\", but type is " \
           f"\"cosine_decay\"" in msg
    restarts = load_config(SHIPPED, ["training.lr_scheduler.type=cosine_restarts",
                                     "training.lr_scheduler.cycle_steps=400", f"training.lr_scheduler.{key}={value}"])
    assert restarts.training.lr_scheduler.type == "cosine_restarts"


def test_frozen_encoder_rate_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="sdxl_ff.config"):
        cfg = load_config(ROOT / "configs" / "quickstart.json", ["model.train_text_encoder_1=false"])
    assert cfg.training.lr_text_encoder_1 == 1e-4
    assert "training.lr_text_encoder_1 is 0.0001 but model.train_text_encoder_1 is false: text encoder 1 stays " \
           "frozen" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sdxl_ff.config"):
        load_config(SHIPPED)
        load_config(ROOT / "configs" / "quickstart.json")
    assert caplog.text == ""  # the shipped configs are consistent


@pytest.mark.parametrize("name", ["../../etc", "a/b", "a\\b", "..", "."])
def test_run_name_must_stay_below_output_root(name):
    msg = error_of(SHIPPED, f"run.name={name}")
    assert f"run.name: {json.dumps(name)} is not a plain folder name" in msg
    assert "may not contain '/' or '\\' or be '.' or '..'" in msg


def test_run_name_refused_before_anything_is_written(tmp_path):
    proc = run_in_process("--set", "run.name=../escaped", "--set", f"run.output_root={tmp_path / 'out'}")
    assert proc.returncode == 2 and 'run.name: "../escaped" is not a plain folder name' in proc.stderr
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "out").exists()


def test_duplicate_keys_are_named_with_their_path(tmp_path):
    path = tmp_path / "dup.json"
    path.write_text('{"run": {"name": "a"}, "training": {"num_steps": 5, "seed": 1, "num_steps": 9,\n'
                    '"tensorboard": {"enabled": false, "enabled": true}}, "run": {"name": "b"}}')
    msg = error_of(path)
    assert str(path) in msg
    for key in ("training.num_steps", "training.tensorboard.enabled", "run"):
        assert f"key '{key}' appears more than once" in msg
    assert "key 'training.seed'" not in msg


@pytest.mark.parametrize("value", ["2024", "1e3", "true", "0.5"])
def test_set_string_key_takes_numbers_literally(value):
    cfg = load_config(SHIPPED, [f"run.name={value}", f"model.revision={value}"])
    assert cfg.run.name == value and cfg.model.revision == value
    assert cfg.training.output_dir == f".output/{value}"


def test_set_optional_string_keeps_null_and_numbers_stay_numbers():
    cfg = load_config(SHIPPED, ["model.revision=null", "training.num_steps=2024"])
    assert cfg.model.revision is None and cfg.training.num_steps == 2024

"""Config rules found by an audit: null sections via --set, eval sizes, seed range, ignored keys, run.name,
duplicate JSON keys, numeric strings via --set. Every error names the key, the value and what is allowed."""

import json
import logging

import pytest
from conftest import ROOT, run_in_process

from sdxl_ff.config.errors import ConfigError
from sdxl_ff.config.load import load_config

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
    with caplog.at_level(logging.WARNING, logger="sdxl_ff.config.load"):
        cfg = load_config(ROOT / "configs" / "quickstart.json", ["model.train_text_encoder_1=false"])
    assert cfg.training.lr_text_encoder_1 == 1e-4
    assert "training.lr_text_encoder_1 is 0.0001 but model.train_text_encoder_1 is false: text encoder 1 stays " \
           "frozen" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sdxl_ff.config.load"):
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


TINY = ["training.num_steps=1", "run.name=x", "model.train_text_encoder_1=false", "model.id=builtin:tiny-sdxl"]
VALIDATION = ["validation.enabled=true", "validation.split=0.5", "validation.every_n_steps=5"]


@pytest.mark.parametrize("overrides, message", [
    # issue 28.11: each was refused only after the model had loaded
    (VALIDATION + ["validation.timesteps=[1000]"],
     "validation.timesteps: [1000] are not below the scheduler's 1000 timesteps; use values in [0, 999]"),
    (["training.max_timestep=1001"],
     "training.max_timestep: 1001 is above the scheduler's 1000 timesteps; use at most 1000 (it is exclusive)"),
    (["training.min_timestep=1000"],
     "training.min_timestep: 1000 leaves no timestep of the scheduler's 1000; use at most 999"),
])
def test_timesteps_beyond_the_scheduler_are_refused_at_config_time(overrides, message):
    assert message in error_of(None, *TINY, *overrides)


def test_the_scheduler_size_is_read_from_the_model_folder_or_the_resumed_one(tmp_path):
    """A Diffusers folder's own scheduler config decides (here 500 timesteps); training.resume_from's wins."""
    from sdxl_ff.config.rules import model_timesteps
    from sdxl_ff.model.parts import build_tiny_sdxl
    assert model_timesteps(load_config(None, TINY)) == build_tiny_sdxl(0).scheduler.config.num_train_timesteps
    for name, count in (("short", 500), ("resumed", 200)):
        (tmp_path / name / "scheduler").mkdir(parents=True)
        (tmp_path / name / "scheduler" / "scheduler_config.json").write_text(json.dumps({"num_train_timesteps": count}))
    short = ["training.num_steps=1", "run.name=x", "model.train_text_encoder_1=false", f"model.id={tmp_path / 'short'}"]
    assert "training.max_timestep: 600 is above the scheduler's 500 timesteps" in error_of(
        None, *short, "training.max_timestep=600")
    assert "validation.timesteps: [500] are not below the scheduler's 500" in error_of(
        None, *short, *VALIDATION, "validation.timesteps=[100, 499, 500]")
    load_config(None, [*short, *VALIDATION, "validation.timesteps=[499]", "training.max_timestep=500"])
    resumed = [f"training.resume_from={tmp_path / 'resumed'}", "training.max_timestep=300"]
    assert "training.max_timestep: 300 is above the scheduler's 200 timesteps" in error_of(None, *short, *resumed)
    # a hub id that is not in the local cache is checked once it is loaded (HF_HUB_OFFLINE: nothing is fetched)
    assert model_timesteps(load_config(None, ["training.num_steps=1", "run.name=x", "model.train_text_encoder_1=false",
                                              "model.id=nobody-sdxl-ff/not-downloaded"])) is None


def test_a_scheduler_unknown_at_config_time_is_checked_once_the_model_loads(tmp_path, monkeypatch):
    """The same rule runs after loading when load_config could not read the scheduler (a hub id not downloaded)."""
    from sdxl_ff.config import rules as config_rules
    monkeypatch.setattr(config_rules, "model_timesteps", lambda cfg: None)
    from conftest import tiny_overrides
    proc = run_in_process(*tiny_overrides(tmp_path, ROOT / "data" / "images", steps=1,
                                          **{"training.max_timestep": "1001"}))
    assert proc.returncode == ConfigError.exit_code
    assert ("error: training.max_timestep: 1001 is above the scheduler's 1000 timesteps; use at most 1000 "
            "(it is exclusive)") in proc.stderr
    assert not (tmp_path / "out" / "test" / "trainer_state.pt").exists()

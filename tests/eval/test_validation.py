"""Validation loss: a seeded split never trained on, the same number on every evaluation and process count,
and a run whose training is bit for bit the run without it."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from conftest import ROOT, run_in_process, tiny_config, tiny_overrides
from two_process_runs import VALIDATED

from sdxl_ff.config.errors import ConfigError
from sdxl_ff.config.load import load_config
from sdxl_ff.data import dataset as data_lib
from sdxl_ff.data.records import DataError, scan_images, split_records
from sdxl_ff.data.synthetic import write_sample_set
from sdxl_ff.eval.validation import Validator, draw_seed, validation_set
from sdxl_ff.model.parts import build_tiny_sdxl
from sdxl_ff.objective.predict import LossWeighting
from train_sdxl_ff import train

IMAGES = ROOT / "data" / "images"


def records_of(folder: Path):
    return scan_images(folder)


def test_split_is_seeded_disjoint_and_stable(tmp_path):
    write_sample_set(tmp_path / "a", count=20, width=64, height=64)
    records = records_of(tmp_path / "a")
    train_a, held_a = split_records(records, 0.25, 7, tmp_path / "a")
    assert len(held_a) == 5 and len(train_a) == 15
    assert {r.path for r in train_a}.isdisjoint({r.path for r in held_a})
    assert {r.path for r in train_a} | {r.path for r in held_a} == {r.path for r in records}
    assert split_records(records, 0.25, 7, tmp_path / "a") == (train_a, held_a)  # the seed decides
    assert {r.path for r in split_records(records, 0.25, 8, tmp_path / "a")[1]} != {r.path for r in held_a}
    # the choice stays with the images: a copy of the folder elsewhere holds out the same names
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    _, held_b = split_records(records_of(tmp_path / "b"), 0.25, 7, tmp_path / "b")
    assert [r.path.name for r in held_b] == [r.path.name for r in held_a]
    assert len(split_records(records, 0.001, 7, tmp_path / "a")[1]) == 1  # at least one
    assert len(split_records(records, 0.999, 7, tmp_path / "a")[0]) == 1  # at least one left to train on
    with pytest.raises(ConfigError, match="holding some out needs at least 2"):
        split_records(records[:1], 0.5, 7, tmp_path / "a")


def test_validation_images_never_appear_in_a_training_batch(tmp_path):
    cfg = tiny_config(tmp_path, IMAGES, **{"validation.enabled": "true", "validation.split": "0.25",
                                           "validation.every_n_steps": "5", "training.batch_size": "2"})
    train_set, sampler = data_lib.build_data(cfg, seed=3, num_processes=1)
    held = {str(r.path) for r in validation_set(cfg, train_set).records}
    assert len(held) == 3  # 12 images, a quarter held out
    loader = data_lib.make_loader(cfg, train_set, sampler, pin_memory=False)
    seen = set()
    for epoch in range(3):
        sampler.epoch, sampler.start = epoch, 0
        for batch in loader:
            seen.update(batch["path"])
    assert len(seen) == 9 and seen.isdisjoint(held)


def test_switched_off_validation_holds_nothing_out(tmp_path):
    """enabled is the switch: a split left in the config while it is off trains on every image."""
    cfg = tiny_config(tmp_path, IMAGES, **{"validation.split": "0.5", "validation.every_n_steps": "5"})
    train_set, _ = data_lib.build_data(cfg, seed=3, num_processes=1)
    assert len(train_set.records) == 12 and train_set.held_out == [] and validation_set(cfg, train_set) is None


def test_validation_folder_overlapping_the_training_images_is_refused(tmp_path):
    cfg = tiny_config(tmp_path, IMAGES, **{"validation.enabled": "true", "validation.image_dir": str(IMAGES),
                                           "validation.every_n_steps": "5"})
    train_set, _ = data_lib.build_data(cfg, seed=3, num_processes=1)
    with pytest.raises(DataError, match="validation.image_dir: 12 image\\(s\\) are also training images"):
        validation_set(cfg, train_set)



def test_split_over_overlapping_sources_names_the_split_and_the_sources(tmp_path, caplog):
    """issue 28.6: the message blamed validation.image_dir (unset) and suggested validation.split (set)."""
    sub = tmp_path / "all" / "sub"
    write_sample_set(tmp_path / "all", count=4, width=64, height=64)
    write_sample_set(sub, count=4, width=64, height=64)
    entries = [{"image_dir": str(tmp_path / "all")}, {"image_dir": str(sub)}]  # the second inside the first
    cfg = tiny_config(tmp_path, tmp_path, **{"data.image_dir": "null", "data.datasets": json.dumps(entries),
                                             "validation.enabled": "true", "validation.split": "0.5",
                                             "validation.every_n_steps": "5"})
    train_set, _ = data_lib.build_data(cfg, seed=3, num_processes=1)
    with pytest.raises(DataError) as error:
        validation_set(cfg, train_set)
    message = str(error.value)
    assert message.startswith("validation.split: 0.5 held out ") and "validation.image_dir:" not in message
    assert "make the data.datasets folders disjoint, or set validation.image_dir" in message
    # disjoint sources: the start-up line says where the held-out images come from (it said "0.5 of None")
    entries = [{"image_dir": str(sub)}, {"image_dir": str(IMAGES)}]
    cfg = tiny_config(tmp_path, tmp_path, **{"data.image_dir": "null", "data.datasets": json.dumps(entries),
                                             "validation.enabled": "true", "validation.split": "0.5",
                                             "validation.every_n_steps": "5"})
    train_set, _ = data_lib.build_data(cfg, seed=3, num_processes=1)
    with caplog.at_level("INFO", logger="sdxl_ff.eval.validation"):
        assert len(validation_set(cfg, train_set).records) == 2 + 6  # half of 4 and half of 12
    assert "validation: 8 images (0.5 of each of the 2 sources of data.datasets, held out of training)" in caplog.text
    assert "None" not in caplog.text

BASE = ["training.num_steps=1", "run.name=x", "model.train_text_encoder_1=false"]


@pytest.mark.parametrize("overrides, message", [
    (["validation.enabled=true", "validation.every_n_steps=5"], "set exactly one of validation.image_dir"),
    (["validation.enabled=true", "validation.split=0.1", "validation.image_dir=v", "validation.every_n_steps=5"],
     "set exactly one of validation.image_dir"),
    (["validation.enabled=true", "validation.split=0.1"], "validation.every_n_steps is not set"),
    (["validation.enabled=true", "validation.split=1", "validation.every_n_steps=5"],
     "validation.split: 1 is out of range; allowed: > 0 and < 1"),
    (["validation.enabled=true", "validation.split=0.1", "validation.every_n_steps=5", "validation.timesteps=[5,5]"],
     "validation.timesteps: [5, 5] must be a non-empty list of distinct timesteps"),
    (["validation.enabled=true", "validation.split=0.1", "validation.every_n_steps=5", "validation.timesteps=[]"],
     "validation.timesteps: [] must be a non-empty list"),
])
def test_invalid_validation_keys_are_refused(overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, BASE + overrides)
    assert message in str(error.value)


def test_timesteps_beyond_the_scheduler_are_refused():
    with pytest.raises(ConfigError, match=r"validation.timesteps: \[1000\] are not below the scheduler's 1000"):
        load_config(None, BASE + ["model.id=builtin:tiny-sdxl", "validation.enabled=true", "validation.split=0.1",
                                  "validation.every_n_steps=5", "validation.timesteps=[100, 1000]"])


def test_two_evaluations_give_the_same_number_and_restore_train_mode(tmp_path):
    cfg = tiny_config(tmp_path, IMAGES, **{"validation.enabled": "true", "validation.split": "0.25",
                                           "validation.every_n_steps": "5"})
    train_set, _ = data_lib.build_data(cfg, seed=3, num_processes=1)
    parts = build_tiny_sdxl(0)
    parts.unet.train()
    parts.text_encoder.eval()
    validator = Validator(validation_set(cfg, train_set), [10, 500, 990], 5, 0, tmp_path)
    scheduler = parts.noise_scheduler()
    accelerator = Accelerator(cpu=True)
    first = validator.table(parts, scheduler, LossWeighting("epsilon"), accelerator.autocast, 0, 1)
    second = validator.table(parts, scheduler, LossWeighting("epsilon"), accelerator.autocast, 0, 1)
    assert first.shape == (3, 3) and torch.equal(first, second)
    assert parts.unet.training and not parts.text_encoder.training  # each module back in its own mode
    halves = [validator.table(parts, scheduler, LossWeighting("epsilon"), accelerator.autocast, r, 2) for r in (0, 1)]
    assert torch.equal(halves[0] + halves[1], first)  # rank 0 rows 0 and 2, rank 1 row 1; the sum is exact
    assert draw_seed(0, 1, 500) != draw_seed(0, 1, 501) and draw_seed(0, 1) == draw_seed(0, 1)


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "validation.jsonl").read_text().splitlines()]


def test_defaults_and_validation_leave_training_bit_for_bit(tmp_path):
    """New keys at their defaults plus a validation set change nothing in the training: same losses, same weights.
    The validation loss is logged before the first step, every N steps and at the last, EMA included."""
    write_sample_set(tmp_path / "val", count=2, width=160, height=128)
    explicit = {"training.timestep_sampling": "uniform", "training.min_timestep": "0", "training.loss_type": "mse",
                "training.debiased_estimation": "false", "training.input_perturbation": "0",
                "training.timestep_shift": "null", "training.max_timestep": "null"}
    validation = {"validation.enabled": "true", "validation.image_dir": str(tmp_path / "val"),
                  "validation.every_n_steps": "2", "model.use_ema": "true", "training.ema_update_every": "1"}
    plain = train(tiny_config(tmp_path, IMAGES, steps=3, **{"run.name": "plain", "model.use_ema": "true",
                                                             "training.ema_update_every": "1"}))
    checked = train(tiny_config(tmp_path, IMAGES, steps=3, **{"run.name": "checked", **explicit, **validation}))
    assert plain["losses"] == checked["losses"]
    a, b = (torch.load(tmp_path / "out" / n / "trainer_state.pt", weights_only=False) for n in ("plain", "checked"))
    assert all(torch.equal(a["ema"]["shadow"][k], b["ema"]["shadow"][k]) for k in a["ema"]["shadow"])
    logged = records(tmp_path / "out" / "checked")
    assert [r["step"] for r in logged] == [0, 2, 3]
    assert logged[0]["val/loss"] == logged[0]["val/loss_ema"]  # two evaluations of the same weights
    assert logged[-1]["val/loss"] != logged[-1]["val/loss_ema"]
    per_t = [logged[0][f"val/loss_t{t}"] for t in (100, 300, 500, 700, 900)]
    assert logged[0]["val/loss"] == pytest.approx(sum(per_t) / 5, rel=1e-6)


def test_two_processes_report_what_one_does(tmp_path, two_process_runs):
    """The step-0 evaluation (the same weights everywhere) is identical to the last bit with 1 and 2 processes."""
    one = run_in_process(*tiny_overrides(tmp_path / "one", IMAGES, steps=1, **{
        **VALIDATED, "training.batch_size": "2"}))
    assert one.returncode == 0, one.stderr[-3000:]
    # the run on two processes with batch 1 each: "validation" in tests/two_process_runs.py
    assert two_process_runs.codes("validation") == [0, 0], two_process_runs.log("validation")[-3000:]
    first, second = records(tmp_path / "one" / "out" / "test"), records(two_process_runs.output("validation"))
    assert len(first) == len(second) == 2  # step 0 and the last step, written once (main process)
    assert first[0] == second[0]


def test_caches_serve_validation_images(tmp_path, caplog):
    """With the latent and text caches the validation images are cached like training images (12 = 9 trained +
    3 held out) and give the validation loss of the uncached run (up to the VAE's batch-size rounding)."""
    import logging
    common = {"validation.enabled": "true", "validation.split": "0.25", "validation.every_n_steps": "5"}
    caches = {"data.latent_cache.enabled": "true", "data.latent_cache.cache_dir": str(tmp_path / "latents"),
              "data.text_embedding_cache.enabled": "true",
              "data.text_embedding_cache.cache_dir": str(tmp_path / "text")}
    with caplog.at_level(logging.INFO):
        train(tiny_config(tmp_path, IMAGES, steps=1, **{"run.name": "cached", **common, **caches}))
    assert "latent cache " + str(tmp_path / "latents") + ": 0 of 3 entries ready, 3 to encode" in caplog.text
    assert ": 0 of 9 entries ready, 9 to encode" in caplog.text
    train(tiny_config(tmp_path, IMAGES, steps=1, **{"run.name": "plain", **common}))
    cached, plain = records(tmp_path / "out" / "cached")[0], records(tmp_path / "out" / "plain")[0]
    assert cached.keys() == plain.keys()
    assert all(cached[k] == pytest.approx(plain[k], rel=1e-4) for k in cached if k != "step")

"""training.num_steps is the total including resumed steps: a finished state is refused, a higher total continues."""

import pytest
import torch
from conftest import run_in_process, tiny_overrides


@pytest.fixture(scope="module")
def finished(tmp_path_factory, sample_dir):
    """A finished 2-step run (its output folder holds trainer_state.pt at step 2)."""
    tmp = tmp_path_factory.mktemp("finished")
    proc = run_in_process(*tiny_overrides(tmp, sample_dir, steps=2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "out" / "test"


def resume(tmp, sample_dir, finished, **extra):
    return run_in_process(*tiny_overrides(tmp, sample_dir, steps=2, **{"training.resume_from": str(finished),
                                                                "run.name": "again", **extra}))


def test_resume_at_the_total_is_refused_before_models_load(finished, tmp_path, sample_dir):
    proc = resume(tmp_path, sample_dir, finished)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "training.num_steps is 2, but the resumed state" in proc.stderr
    assert "is already at step 2: nothing is left to train" in proc.stderr
    assert "raise training.num_steps above 2" in proc.stderr
    assert "INFO device:" not in proc.stderr  # refused before the model was loaded
    assert not (tmp_path / "out" / "again").exists()


def test_resume_past_the_total_by_epochs_is_refused(finished, tmp_path, sample_dir):
    # 8 images, batch 4: 2 optimizer steps per epoch, so one epoch is already done at step 2
    proc = resume(tmp_path, sample_dir, finished, **{"training.num_steps": "null", "training.num_epochs": "1"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "training.num_epochs is 1 (2 optimizer steps), but the resumed state" in proc.stderr
    assert "or raise training.num_epochs" in proc.stderr


def test_higher_total_trains_only_the_missing_steps(finished, tmp_path, sample_dir):
    proc = resume(tmp_path, sample_dir, finished, **{"training.num_steps": "3"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "done: 1 steps" in proc.stderr
    state = torch.load(tmp_path / "out" / "again" / "trainer_state.pt", weights_only=False)
    before = torch.load(finished / "trainer_state.pt", weights_only=False)
    assert state["global_step"] == 3 and state["losses"][:2] == before["losses"] and len(state["losses"]) == 3


def test_changed_optimizer_settings_win_over_the_state(finished, tmp_path, sample_dir):
    """torch's load_state_dict brings back the saved weight_decay/betas/eps; the config's must win, as lr does."""
    proc = resume(tmp_path, sample_dir, finished, **{"training.num_steps": "3", "optimizer.weight_decay": "0.1",
                                                     "optimizer.betas": "[0.8, 0.95]"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resume: unet weight_decay 0.01 in the state, 0.1 in the config: the config wins" in proc.stderr
    assert "resume: unet betas (0.9, 0.999) in the state, (0.8, 0.95) in the config" in proc.stderr
    state = torch.load(tmp_path / "out" / "again" / "trainer_state.pt", weights_only=False)
    groups = state["optimizer"]["param_groups"]
    assert [(g["weight_decay"], tuple(g["betas"])) for g in groups] == [(0.1, (0.8, 0.95))]
    unchanged = resume(tmp_path, sample_dir, finished, **{"training.num_steps": "3", "run.name": "same"})
    assert unchanged.returncode == 0 and "in the config: the config wins" not in unchanged.stderr


def test_stop_at_the_last_step_finishes_the_run(monkeypatch, tmp_path, sample_dir):
    # A Ctrl-C at the last step used to save a checkpoint already at the total, which resume now refuses.
    from conftest import tiny_config

    from sdxl_ff.checkpoint.checkpointer import StopRequest
    from train_sdxl_ff import train
    monkeypatch.setattr(StopRequest, "requested", property(lambda self: True))  # as if Ctrl-C came at once
    stopped = train(tiny_config(tmp_path, sample_dir, steps=2))
    assert stopped["interrupted"] == "SIGINT" and stopped["global_step"] == 1  # stops after the first step
    checkpoint = tmp_path / "out" / "test" / "checkpoints" / "step-0000001"
    finished = train(tiny_config(tmp_path, sample_dir, steps=2, **{"training.resume_from": str(checkpoint)}))
    assert finished["interrupted"] is None and finished["global_step"] == 2
    assert torch.load(tmp_path / "out" / "test" / "trainer_state.pt", weights_only=False)["global_step"] == 2

"""End to end: v-prediction + zero terminal SNR + EMA reach the saved model; a NaN loss stops the run cleanly."""

import hashlib
import json
import logging

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from conftest import ROOT, run_in_process, tiny_config, tiny_overrides, unet_weights
from diffusers import StableDiffusionXLPipeline
from PIL import Image

from sdxl_ff.checkpoint.model_folder import save_outputs
from sdxl_ff.config.load import load_config
from sdxl_ff.eval.evaluation import load_prompts, run_eval
from sdxl_ff.model.parts import build_tiny_sdxl, load_parts
from sdxl_ff.model.trainables import Trainables
from sdxl_ff.parallel.accelerator import compile_unet
from sdxl_ff.train.stability import clip_gradients
from train_sdxl_ff import train

STEPS = 6
OBJECTIVES = {"training.prediction_type": "v_prediction", "training.zero_terminal_snr": "true",
              "training.snr_gamma": "5", "training.min_sigma": "0.4", "training.min_sigma_warmup_steps": "2",
              "training.noise_offset": "0.1", "training.max_grad_norm": "1.0", "training.detect_anomaly": "true",
              "training.lr_scheduler": '{"type": "cosine_decay", "warmup_steps": 2, "min_factor": 0.1}',
              "training.lr_warmup_steps": "2", "training.ema_update_every": "2", "model.ema_decay": "0.5"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same seeded run twice: with EMA, and without (the trajectories are identical)."""
    out = {}
    for name, ema in (("ema", "true"), ("plain", "false")):
        tmp = tmp_path_factory.mktemp(name)
        proc = run_in_process(*tiny_overrides(tmp, ROOT / "data" / "images", steps=STEPS,
                                       **{**OBJECTIVES, "model.use_ema": ema}))
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[name] = (tmp / "out" / "test", proc)
    return out


def test_saved_scheduler_is_v_prediction_with_zero_terminal_snr(runs):
    folder, proc = runs["ema"]
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert config["_class_name"] == "EulerDiscreteScheduler"
    assert config["prediction_type"] == "v_prediction" and config["rescale_betas_zero_snr"] is True
    assert config["timestep_spacing"] == "trailing"
    assert "objective: v_prediction prediction, zero terminal SNR; loss weighting: Min-SNR-γ 5" in proc.stderr
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    image = pipe("a red circle", num_inference_steps=3, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3) and bool(torch.isfinite(torch.from_numpy(image)).all())


def test_final_save_uses_ema_weights(runs):
    folder, proc = runs["ema"]
    state = torch.load(folder / "trainer_state.pt", weights_only=False)
    ema = state["ema"]
    assert state["ema_in_weights"] is True and "final save: EMA weights" in proc.stderr
    assert (ema["started_at"], ema["num_updates"], ema["update_every"]) == (2, 2, 2)  # updates at steps 4 and 6
    saved = unet_weights(folder)
    assert saved.keys() == {k.removeprefix("unet.") for k in ema["shadow"] if k.startswith("unet.")}
    assert all(torch.equal(saved[k], ema["shadow"][f"unet.{k}"]) for k in saved)
    plain = unet_weights(runs["plain"][0])  # the trained weights of the same trajectory
    assert not all(torch.equal(saved[k], plain[k]) for k in saved)
    assert torch.load(runs["plain"][0] / "trainer_state.pt", weights_only=False)["ema"] is None


def test_resume_from_ema_output_folder_warns(runs, tmp_path):
    """A finished use_ema output holds the EMA weights: resuming there is allowed, with a warning."""
    folder, _ = runs["ema"]
    proc = run_in_process(*tiny_overrides(tmp_path, ROOT / "data" / "images", steps=STEPS + 1, **{
        **OBJECTIVES, "model.use_ema": "true", "training.resume_from": str(folder)}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resume: {folder} holds the EMA weights" in proc.stderr
    assert "For an exact continuation resume from a checkpoint folder (<output_dir>/checkpoints/step-*)" in proc.stderr
    assert f"resume: from {folder} at step {STEPS}" in proc.stderr
    assert torch.load(tmp_path / "out" / "test" / "trainer_state.pt", weights_only=False)["global_step"] == STEPS + 1


def test_lr_curve_png_and_logged_schedule(runs):
    folder, proc = runs["plain"]
    assert (folder / "lr_schedule.png").is_file()
    assert "learning rate: cosine_decay, warmup 2 steps, min_factor 0.1" in proc.stderr
    state = torch.load(folder / "trainer_state.pt", weights_only=False)
    assert state["lr_factor"] == pytest.approx(0.1)  # the last step of a cosine decay reaches min_factor


def digest(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "lr_schedule.png"}


def test_nan_loss_stops_and_keeps_last_state(runs, tmp_path):
    folder, _ = runs["plain"]
    before = digest(folder)
    # An absurd learning rate makes the weights overflow after the first step: a real NaN, no test hook.
    overrides = {**OBJECTIVES, "training.lr_scheduler": "null", "training.lr_unet": "1e30",
                 "training.max_grad_norm": "null", "run.output_root": str(folder.parent), "optimizer.type": "adamw",
                 "optimizer.weight_decay": "0"}  # lr x decay must stay below 1 (a start-up rule)
    proc = run_in_process("--overwrite", *tiny_overrides(tmp_path, ROOT / "data" / "images", steps=STEPS, **overrides))
    assert proc.returncode == 3, proc.stderr[-3000:]
    message = proc.stderr[proc.stderr.index("error: training.detect_anomaly"):]
    assert "the loss became nan at optimizer step 2" in message
    assert f"the last good state is {folder / 'trainer_state.pt'}" in message
    assert str(ROOT / "data" / "images") in message.split("batch files:")[1]
    assert digest(folder) == before  # weights and state untouched
    state = torch.load(folder / "trainer_state.pt", weights_only=False)
    assert state["global_step"] == STEPS
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]


def test_nan_loss_read_one_step_late_still_stops_before_the_checkpoint_of_its_step(tmp_path):
    """detect_anomaly reads a step's loss after the next step is queued; a checkpoint due at the bad step itself
    reads it first, so no NaN weights are written."""
    overrides = {"training.lr_unet": "1e30", "training.detect_anomaly": "true", "training.checkpoint_every": "2",
                 "training.max_grad_norm": "null", "optimizer.type": "adamw",
                 "optimizer.weight_decay": "0"}  # lr x decay must stay below 1 (a start-up rule)
    proc = run_in_process(*tiny_overrides(tmp_path, ROOT / "data" / "images", steps=4, **overrides))
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "training.detect_anomaly: the loss became nan at optimizer step 2" in proc.stderr
    assert "no state was saved by this run, and nothing was written" in proc.stderr
    assert not list((tmp_path / "out" / "test").glob("checkpoint*"))


def test_clipping_bounds_the_gradient_norm():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 4))
    (model(torch.randn(8, 16)) * 1000).pow(2).mean().backward()
    params = list(model.parameters())
    raw = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item()
    direction = [p.grad.clone() / raw for p in params]
    before = clip_gradients(Accelerator(cpu=True), params, max_norm=1.0)
    after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item()
    assert before == pytest.approx(raw, rel=1e-5) and raw > 10
    assert after == pytest.approx(1.0, rel=1e-4)
    assert all(torch.allclose(p.grad, d, atol=1e-6) for p, d in zip(params, direction, strict=True))
    assert clip_gradients(Accelerator(cpu=True), params, None) is None
    assert clip_gradients(Accelerator(cpu=True), params, None, measure=True) == pytest.approx(1.0, rel=1e-4)
    assert all(torch.allclose(p.grad, d, atol=1e-6) for p, d in zip(params, direction, strict=True))  # unclipped


def test_saved_keys_clean_with_compiled_unet(tmp_path):
    """torch.compile wraps the UNet (keys `_orig_mod.*`); the saved folder must hold the model's own keys."""
    parts = build_tiny_sdxl(0)
    own_keys = set(parts.unet.state_dict())
    parts.unet = compile_unet(parts.unet, {"backend": "eager"})  # lazy: no compiling happens here
    assert all(k.startswith("_orig_mod.") for k in parts.unet.state_dict())
    cfg = load_config(None, [f"training.output_dir={tmp_path / 'out'}", "training.num_steps=1",
                             "model.train_text_encoder_1=false"])
    save_outputs(cfg, parts, Trainables({"unet": parts.unet}), Accelerator(cpu=True), {"global_step": 0})
    saved = unet_weights(tmp_path / "out")
    assert set(saved) == own_keys
    reloaded = StableDiffusionXLPipeline.from_pretrained(tmp_path / "out", local_files_only=True).unet
    assert set(reloaded.state_dict()) == own_keys


def test_resume_continues_ema_and_schedule_bit_exactly(tmp_path, caplog):
    """Checkpoints carry the EMA; the LR factor is a function of the step: stopping and resuming changes nothing."""
    def config(name, **extra):
        return tiny_config(tmp_path, ROOT / "data" / "images", steps=STEPS, **{
            **OBJECTIVES, "training.prediction_type": "null", "training.zero_terminal_snr": "false",
            "model.use_ema": "true", "training.lr_warmup_steps": "1", "run.name": name, **extra})

    assert train(config("straight", **{"training.checkpoint_every": "3"}))["interrupted"] is None
    checkpoint = tmp_path / "out" / "straight" / "checkpoints" / "step-0000003"
    assert torch.load(checkpoint / "trainer_state.pt", weights_only=False)["ema"]["num_updates"] == 1
    with caplog.at_level(logging.INFO):
        train(config("resumed", **{"training.resume_from": str(checkpoint)}))
    assert f"resume: from {checkpoint} at step 3" in caplog.text
    assert "holds the EMA weights" not in caplog.text  # a checkpoint holds the trained weights: no warning
    straight, resumed = (torch.load(tmp_path / "out" / n / "trainer_state.pt", weights_only=False)
                         for n in ("straight", "resumed"))
    assert straight["losses"] == resumed["losses"]
    assert (straight["ema"]["num_updates"], straight["ema"]["started_at"]) == (2, 1)  # steps 3 and 5
    shadow_a, shadow_b = straight["ema"]["shadow"], resumed["ema"]["shadow"]
    assert all(torch.equal(shadow_a[k], shadow_b[k]) for k in shadow_a)
    a, b = unet_weights(tmp_path / "out" / "straight"), unet_weights(tmp_path / "out" / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_final_eval_samples_with_ema_weights(tmp_path):
    """eval.use_ema: the final eval renders with the EMA weights, i.e. exactly like the saved (EMA) folder."""
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"prompt": "a red circle", "seed": 5, "height": 64, "width": 64}]))
    cfg = tiny_config(tmp_path, ROOT / "data" / "images", steps=4, **{
        "model.use_ema": "true", "training.ema_update_every": "1", "model.ema_decay": "0.5",
        "eval.use_ema": "true", "eval.final.enabled": "true", "eval.prompts_path": str(prompts),
        "eval.backend": "kdiffusion", "eval.num_inference_steps": "2"})
    train(cfg)
    folder = tmp_path / "out" / "test"
    during = np.asarray(Image.open(folder / "eval" / "final" / "grid.png"))
    saved = load_parts(str(folder))
    again = run_eval(saved, cfg.eval, load_prompts(str(prompts), 64, 64), tmp_path / "again")
    assert np.array_equal(during, np.asarray(again.grid))


def test_full_bf16_evals_with_ema_change_no_training(tmp_path):
    """model.full_bf16 + eval.use_ema: each live eval packs the EMA into the bf16 weights and back (no backup
    copy); the run is bit for bit the run without evals: losses, EMA, saved (EMA) weights."""
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"prompt": "a red circle", "seed": 5, "height": 64, "width": 64}]))
    common = {"model.use_bf16": "true", "model.full_bf16": "true", "training.max_grad_norm": "null",
              "model.use_ema": "true", "training.ema_update_every": "1", "model.ema_decay": "0.5"}
    evals = {"eval.use_ema": "true", "eval.live.enabled": "true", "eval.live.every_n_steps": "1",
             "eval.prompts_path": str(prompts), "eval.backend": "kdiffusion", "eval.num_inference_steps": "2"}
    states, weights = {}, {}
    for name, extra in (("evals", evals), ("plain", {})):
        proc = run_in_process(*tiny_overrides(tmp_path / name, ROOT / "data" / "images", steps=3, **common, **extra))
        assert proc.returncode == 0, proc.stderr[-3000:]
        folder = tmp_path / name / "out" / "test"
        states[name] = torch.load(folder / "trainer_state.pt", weights_only=False)
        weights[name] = unet_weights(folder)
    assert len(list((tmp_path / "evals" / "out" / "test" / "eval" / "live").iterdir())) == 3
    assert states["evals"]["losses"] == states["plain"]["losses"]
    ema_a, ema_b = states["evals"]["ema"]["shadow"], states["plain"]["ema"]["shadow"]
    assert states["evals"]["ema"]["num_updates"] == 3 and all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    assert all(v.dtype == torch.bfloat16 for v in weights["plain"].values())
    assert all(torch.equal(weights["evals"][k], v) for k, v in weights["plain"].items())

"""End to end on the CPU with the tiny SDXL: the real CLI, real files, real diffusers/bitsandbytes classes.

The printed commands start the CLI as a user does (bash, another folder); every other run calls its main() in this
process (that a real run's console holds no library noise is tests/runtime/test_console.py's check).
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, run_in_process, tiny_overrides
from diffusers import StableDiffusionXLPipeline

from sdxl_ff.model.parts import build_tiny_sdxl

# 36 steps: the last 12 losses average 0.41 of the first 12 (measured; 60 steps gave the same 0.41, the loss levels
# off by step 30), against the test's 0.5
STEPS, K = 36, 12


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One 36-step run training UNet + encoder 1 (encoder 2 frozen) on the bundled sample images."""
    tmp = tmp_path_factory.mktemp("run")
    args = tiny_overrides(tmp, ROOT / "data" / "images", steps=STEPS, **{
        "model.train_text_encoder_1": "true", "training.lr_text_encoder_1": "1e-4",
        "training.log_every": "10"})
    proc = run_in_process(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "out" / "test", proc


def test_writes_diffusers_folder_and_state(trained):
    out, proc = trained
    for part in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        assert (out / part).is_dir(), part
    assert (out / "model_index.json").is_file()
    state = torch.load(out / "trainer_state.pt", weights_only=False)
    assert state["global_step"] == STEPS and state["trained"] == ["unet", "text_encoder"]
    assert {"python", "numpy", "torch"} <= set(state["rng"])
    saved = json.loads((out / "sdxl_ff_config.json").read_text())
    assert saved["training"]["num_steps"] == STEPS and saved["model"]["id"] == "builtin:tiny-sdxl"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_log_says_what_was_chosen(trained):
    _, proc = trained
    for expected in ("device: cpu", "precision: fp32", "attention: PyTorch SDPA",
                     "optimizer: AdamW8bit (bitsandbytes", "seed: 1234", "128x128: 12 images"):
        assert expected in proc.stderr, expected


def test_saved_folder_reloads_and_generates(trained):
    out, _ = trained
    pipe = StableDiffusionXLPipeline.from_pretrained(out, local_files_only=True)
    image = pipe("a red circle on a green background", num_inference_steps=3, height=128, width=128,
                 output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 128, 128, 3) and float(image.std()) > 0


def test_loss_goes_down(trained):
    out, _ = trained
    losses = torch.load(out / "trainer_state.pt", weights_only=False)["losses"]
    first, last = sum(losses[:K]) / K, sum(losses[-K:]) / K
    assert len(losses) == STEPS
    assert last < 0.5 * first, (first, last)


def test_selective_training(trained):
    out, _ = trained
    base = build_tiny_sdxl(0)
    pipe = StableDiffusionXLPipeline.from_pretrained(out, local_files_only=True)

    def same(a, b):
        sa, sb = a.state_dict(), b.state_dict()
        return all(torch.equal(sa[k], sb[k]) for k in sa)

    assert same(pipe.text_encoder_2, base.text_encoder_2)  # frozen: bit-identical
    assert same(pipe.vae, base.vae)
    assert not same(pipe.text_encoder, base.text_encoder)
    assert not same(pipe.unet, base.unet)


def test_optimizer_state_is_8bit(trained):
    out, _ = trained
    opt = torch.load(out / "trainer_state.pt", weights_only=False)["optimizer"]
    # bitsandbytes 0.50 nests each parameter's tensors under this key in state_dict()
    states = [s.get("__bnb_optimizer_quant_state__", s) for s in opt["state"].values()]
    big = [s for s in states if s["state1"].numel() >= 4096]
    assert big, "expected 8-bit state for large tensors"
    assert all(s["state1"].dtype == torch.uint8 and s["state2"].dtype == torch.uint8 for s in big)
    small = [s for s in states if s["state1"].numel() < 4096]
    assert all(s["state1"].dtype == torch.float32 for s in small)  # bitsandbytes' min_8bit_size


def test_seed_zero_draws_and_logs_a_seed(tmp_path):
    proc = run_in_process(*tiny_overrides(tmp_path, ROOT / "data" / "images", steps=1, **{"training.seed": "0"}))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "(random; set training.seed=" in proc.stderr


def test_bad_data_exits_with_file_name(tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    (images / "x.png").write_bytes(b"nope")
    (images / "x.txt").write_text("c")
    proc = run_in_process(*tiny_overrides(tmp_path, images, steps=1))
    assert proc.returncode == 2
    assert "x.png: not a readable image" in proc.stderr


def test_unwritable_output_folders_stop_before_the_model_loads(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    proc = run_in_process(*tiny_overrides(tmp_path, ROOT / "data" / "images", steps=1, **{
        "run.output_root": str(tmp_path / "a_file" / "out"), "training.tensorboard.enabled": "true",
        "training.tensorboard.log_dir": str(tmp_path / "tb" / "run")}))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"error: training.output_dir: cannot write to {tmp_path}/a_file/out/test: {tmp_path}/a_file is a file, " \
           f"not a folder. Choose a folder you can write to" in proc.stderr
    assert "INFO device:" not in proc.stderr  # before the model loaded
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # the TensorBoard probe left nothing


def test_fresh_run_into_an_earlier_runs_folder_is_refused(trained):
    out, _ = trained
    before = (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    proc = run_in_process(*tiny_overrides(out.parent.parent, ROOT / "data" / "images", steps=STEPS + 1))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"error: training.output_dir: {out} already holds an earlier run ({out}/trainer_state.pt)" in proc.stderr
    assert (f"it finished; to train it further, resume it with a larger total: cd {ROOT} && {sys.executable} "
            f"{ROOT / 'train_sdxl_ff.py'} --config config.json --set device=cpu") in proc.stderr
    assert (f"--set training.num_steps={2 * STEPS} --set training.resume_from={out}; to start a new one, choose "
            f"another run.name") in proc.stderr
    assert "INFO device:" not in proc.stderr
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == before


def test_printed_commands_run_as_printed_from_any_folder(tmp_path):
    """The refusal of a fresh run into a finished run's folder offers a command that trains it further; run as
    printed from another folder, with no venv on PATH, it does (the same values would be refused: nothing left)."""
    args = tiny_overrides(tmp_path, ROOT / "data" / "images", steps=2)
    assert run_in_process(*args).returncode == 0
    refused = run_in_process(*args)
    assert refused.returncode == 2 and "to continue it" not in refused.stderr, refused.stderr[-2000:]
    command = refused.stderr.split("to train it further, resume it with a larger total: ")[1].split("; to start")[0]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {key: value for key, value in os.environ.items() if key not in ("VIRTUAL_ENV", "PYTHONPATH")}
    done = subprocess.run(["bash", "-c", command], cwd=elsewhere, capture_output=True, text=True, timeout=600,
                          env={**env, "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    state = torch.load(tmp_path / "out" / "test" / "trainer_state.pt", weights_only=False)
    assert state["global_step"] == 4 and len(state["losses"]) == 4


def test_overwrite_starts_fresh_in_an_earlier_runs_folder(tmp_path):
    args = tiny_overrides(tmp_path, ROOT / "data" / "images", steps=2, **{"training.checkpoint_every": "1"})
    assert run_in_process(*args).returncode == 0
    again = run_in_process("--overwrite", *args[:-2], "--set", "training.num_steps=1")
    assert again.returncode == 0, again.stderr[-2000:]
    out = tmp_path / "out" / "test"
    assert f"WARNING --overwrite: {out} holds an earlier run ({out}/trainer_state.pt and 1 more)" in again.stderr
    assert torch.load(out / "trainer_state.pt", weights_only=False)["global_step"] == 1


def test_frozen_modules_saved_as_loaded_under_bf16(tmp_path):
    """Frozen encoders and the VAE run in bf16 for compute but are saved bit-identical to the base."""
    proc = run_in_process(*tiny_overrides(tmp_path, ROOT / "data" / "images", steps=2,
                                          **{"model.use_bf16": "true"}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "precision: bf16" in proc.stderr
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "out" / "test", local_files_only=True)
    base = build_tiny_sdxl(0)
    for name in ("text_encoder", "text_encoder_2", "vae"):
        saved, ref = getattr(pipe, name).state_dict(), getattr(base, name).state_dict()
        assert all(saved[k].dtype == torch.float32 and torch.equal(saved[k], ref[k]) for k in ref), name
    assert not all(torch.equal(pipe.unet.state_dict()[k], v) for k, v in base.unet.state_dict().items())


def test_train_further_keeps_a_state_kept_elsewhere(tmp_path):
    """A finished run whose state_path lies outside its output folder: the command names that state."""
    import shlex

    from conftest import tiny_config

    from sdxl_ff.checkpoint.model_folder import check_fresh_output
    from sdxl_ff.config.errors import ConfigError
    cfg = tiny_config(tmp_path, ROOT / "data" / "images", steps=3,
                      **{"training.state_path": str(tmp_path / "states" / "s.pt")})
    out = tmp_path / "out" / "test"
    out.mkdir(parents=True)
    (tmp_path / "states").mkdir()
    (tmp_path / "states" / "s.pt").write_bytes(b"state")
    (out / "model_index.json").write_text("{}")
    (out / "sdxl_ff_config.json").write_text(json.dumps({"training": {"num_steps": 3, "num_epochs": 1.5}}))
    with pytest.raises(ConfigError) as info:
        check_fresh_output(cfg)
    command = str(info.value).split("resume it with a larger total: ")[1].split("; to start")[0]
    words = shlex.split(command.split(" && ", 1)[1])
    assert words[-8:] == ["--set", "training.num_steps=6", "--set", "training.num_epochs=3.0", "--set",
                          f"training.resume_state_path={tmp_path / 'states' / 's.pt'}", "--set",
                          f"training.resume_from={out}"]

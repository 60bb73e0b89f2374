"""sample.py: the image eval.final drew, bit for bit; the EMA of a checkpoint; one line for each bad input."""

import json
import os
import re
import shlex
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from conftest import ROOT, run_in_process, tiny_overrides
from PIL import Image

import sample
from sdxl_ff.config.schema import EvalConfig
from sdxl_ff.eval.backends import EvalPrompt
from sdxl_ff.eval.evaluation import render_image
from sdxl_ff.model.parts import build_tiny_sdxl

PROMPTS = [{"prompt": "a red circle on a green background", "negative_prompt": "blue", "seed": 7},
           {"prompt": "a yellow square", "seed": 3, "size": "64x72"}]
# the run's eval, as sample.py options: a stochastic k-diffusion sampler, so the noise must be drawn alike too
SETTINGS = ["--backend", "kdiffusion", "--sampler", "dpmpp_2m_sde", "--scheduler", "karras", "--steps", "3",
            "--cfg", "5", "--size", "64"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """3 steps of the tiny SDXL with an EMA (decay 0.5, every step), eval.live at step 2 and eval.final with the
    EMA, a checkpoint at step 2: (tmp, output folder, the run's console)."""
    tmp = tmp_path_factory.mktemp("sample_cli")
    prompts = tmp / "prompts.json"
    prompts.write_text(json.dumps(PROMPTS))
    proc = run_in_process(*tiny_overrides(tmp, ROOT / "data" / "images", steps=3, **{
        "model.use_ema": "true", "model.ema_decay": "0.5", "training.ema_update_every": "1", "eval.use_ema": "true",
        "training.checkpoint_every": "2", "eval.prompts_path": str(prompts), "eval.final.enabled": "true",
        "eval.live.enabled": "true", "eval.live.every_n_steps": "2", "eval.live.max_batches": "1",
        "eval.backend": "kdiffusion", "eval.sampler_name": "dpmpp_2m_sde", "eval.scheduler": "karras",
        "eval.num_inference_steps": "3", "eval.cfg_scale": "5", "eval.height": "64", "eval.width": "64"}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, tmp / "out" / "test", proc.stderr


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def first_prompt() -> list[str]:
    entry = PROMPTS[0]
    return ["--prompt", entry["prompt"], "--negative", entry["negative_prompt"], "--seed", str(entry["seed"])]


def test_the_image_is_eval_finals_bit_for_bit(run):
    tmp, out, _ = run
    target = tmp / "from_final"
    assert sample.main(["--model", str(out), "--prompts", str(tmp / "prompts.json"), *SETTINGS,
                        "--out", str(target)]) == 0
    names = ["000_seed7.png", "001_seed3.png"]
    assert sorted(p.name for p in target.iterdir()) == names  # nothing else: no temporary file left
    for name in names:
        expected = pixels(out / "eval" / "final" / name)
        assert expected.std() > 1  # a drawn image, not a flat one
        assert np.array_equal(pixels(target / name), expected), name
    assert pixels(target / names[1]).shape == (72, 64, 3)  # the entry's own size beats --size


def test_a_checkpoints_ema_is_used_and_no_ema_differs(run):
    tmp, out, _ = run
    checkpoint = out / "checkpoints" / "step-0000002"
    ema, trained = tmp / "ema.png", tmp / "trained.png"
    assert sample.main(["--model", str(checkpoint), *first_prompt(), *SETTINGS, "--out", str(ema)]) == 0
    # eval.live at step 2 drew with the EMA swapped in (eval.use_ema): the EMA from trainer_state.pt is that EMA
    assert np.array_equal(pixels(ema), pixels(out / "eval" / "live" / "step_2" / "000_seed7.png"))
    assert sample.main(["--model", str(checkpoint), *first_prompt(), *SETTINGS, "--out", str(trained),
                        "--no-ema"]) == 0
    assert (pixels(trained) != pixels(ema)).any(axis=2).sum() > 100  # the trained weights draw another image
    assert sample.main(["--model", str(checkpoint), *first_prompt(), *SETTINGS, "--out", str(ema), "--no-ema",
                        "--overwrite"]) == 0
    assert np.array_equal(pixels(ema), pixels(trained))  # --overwrite replaced it


def test_a_single_file_checkpoint_with_config_dir(run, capsys):
    from sdxl_ff.export.single_file import convert_folder
    tmp, out, _ = run
    single = tmp / "single.safetensors"
    convert_folder(out, single)
    image = tmp / "single.png"
    capsys.readouterr()
    assert sample.main(["--model", str(single), "--config-dir", str(out), *first_prompt(), *SETTINGS,
                        "--out", str(image)]) == 0
    assert np.array_equal(pixels(image), pixels(out / "eval" / "final" / "000_seed7.png"))
    assert "Loading pipeline components" not in capsys.readouterr().err  # diffusers' loading bar


def test_bad_input_gets_one_line_and_exit_2(run, capsys):
    tmp, out, _ = run
    existing = tmp / "existing.png"
    existing.write_bytes(b"mine")
    model = ["--model", str(out), "--prompt", "a red circle"]
    cases = [
        (["--model", str(tmp / "nowhere"), "--prompt", "x"], f"--model: {tmp / 'nowhere'} does not exist"),
        (["--model", str(tmp / "out"), "--prompt", "x"], f"did you mean {out}?"),
        ([*model, "--sampler", "eular"], "--sampler: 'eular' is not a sampler of --backend 'diffusers'"),
        ([*model, "--backend", "kdiffusion", "--scheduler", "karas"], "did you mean 'karras'?"),
        ([*model, "--size", "64x"], "--size: '64x' is not a size; give WIDTHxHEIGHT"),
        ([*model, "--size", "100"], "--size: '100': the width 100 must be at least 64 and divisible by 8"),
        ([*model, "--out", str(existing)], f"--out: {existing} exists; pass --overwrite"),
        ([*model, "--out", str(tmp / "a.jpg")], "sample.py writes PNG images"),
        ([*model, "--no-ema", "--out", str(tmp / "no_ema.png")],
         f"holds the EMA weights in place of the trained ones (the final save of a model.use_ema run); a checkpoint "
         f"keeps them with the EMA beside them, e.g. --model {out / 'checkpoints' / 'step-0000002'} --no-ema"),
        ([*model, "--config-dir", str(out)], "--config-dir goes with a single-file checkpoint"),
        (["--model", str(out), "--prompts", str(tmp / "prompts.json"), "--seed", "1"], "--seed goes with --prompt"),
        ([*model, "--steps", "many"], "argument --steps: invalid int value: 'many'"),
    ]
    capsys.readouterr()
    for argv, message in cases:
        assert sample.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and message in err, (argv, err)
    assert existing.read_bytes() == b"mine" and not (tmp / "no_ema.png").exists()


OURS = re.compile(r"\d\d:\d\d:\d\d INFO |image 1/1")


def test_the_printed_command_runs_as_printed(run):
    """The "next:" line as a user pastes it: from another folder, no venv on PATH; the console is ours."""
    tmp, out, console = run
    printed = re.search(r"^  render a sample: +(.*)$", console, re.MULTILINE).group(1)
    assert printed == shlex.join([sys.executable, str(ROOT / "sample.py"), "--model", str(out), "--prompt", "a photo",
                                  *SETTINGS[:-1], "64x64", "--out", str(out / "sample.png")])
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    env = {key: value for key, value in os.environ.items() if key not in ("VIRTUAL_ENV", "PYTHONPATH")}
    proc = subprocess.run(["bash", "-c", printed], cwd=elsewhere, env={**env, "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in re.split(r"[\r\n]+", proc.stderr + proc.stdout) if line.strip()]
    assert [line for line in lines if not OURS.match(line)] == [], lines  # no FutureWarning, no library lines
    assert any(line.endswith(f"INFO wrote {out / 'sample.png'} (seed 0, 64x64)") for line in lines)
    assert any(line.startswith("image 1/1: 100%") and "3/3" in line for line in lines)  # the bar's last state
    same = tmp / "same.png"  # the same settings in this process: the same pixels
    assert sample.main(["--model", str(out), "--prompt", "a photo", *SETTINGS, "--out", str(same)]) == 0
    assert np.array_equal(pixels(out / "sample.png"), pixels(same))
    assert list(elsewhere.iterdir()) == []  # nothing written where it ran


def test_the_progress_callback_sees_every_step_and_no_library_warning():
    """k-diffusion's lms ends on an extra denoiser call; diffusers' dpmpp_sde takes two timesteps a step (and its
    torchsde warns about float32 rounding at the interval ends unless told not to)."""
    parts = build_tiny_sdxl(0)
    prompt = EvalPrompt(0, "a red circle", "", 1, 64, 64)
    for cfg, total in ((EvalConfig(backend="kdiffusion", sampler_name="lms", num_inference_steps=3), 3),
                       (EvalConfig(sampler_name="dpmpp_sde", scheduler="karras", num_inference_steps=3), 5)):
        calls = []
        with warnings.catch_warnings(record=True) as caught, torch.inference_mode():
            warnings.simplefilter("always")
            render_image(parts, cfg, prompt, lambda done, steps, calls=calls: calls.append((done, steps)))
        assert calls == [(k, total) for k in range(1, total + 1)], cfg
        assert not [w for w in caught if "Should have t" in str(w.message)], cfg

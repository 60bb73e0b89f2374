"""The console of a real run holds our own lines and progress bars, none of the libraries' noise."""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, run_cli, tiny_overrides

OURS = re.compile(r"\d\d:\d\d:\d\d (INFO|WARNING) |  |training: |step \d+/\d+ |INFO wrote .*\.safetensors: ")
NOISE = ("Writing model shards", "Loading weights", "FutureWarning", "gradient_checkpointing_enable", "kernels",
         "pkg_resources", "Warning:", "it/s]")


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    """`--save-tiny-model` as a user runs it: the folder it wrote and the process; `run` trains from that folder."""
    tmp = tmp_path_factory.mktemp("saved_tiny")
    proc = run_cli("--save-tiny-model", str(tmp / "tiny"), cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "tiny", proc


@pytest.fixture(scope="module")
def run(tmp_path_factory, saved_tiny):
    """Everything that used to speak: saves (checkpoint + final), loading a Diffusers folder, gradient
    checkpointing of a text encoder, TensorBoard, a k-diffusion eval and the converter (bitsandbytes)."""
    tmp = tmp_path_factory.mktemp("console")
    proc = run_cli(*tiny_overrides(tmp, ROOT / "data" / "images", steps=2, **{
        "model.id": str(saved_tiny[0]), "training.checkpoint_every": "1", "model.train_text_encoder_1": "true",
        "training.lr_text_encoder_1": "1e-4", "model.use_gradient_checkpointing": "true",
        "training.tensorboard.enabled": "true", "training.tensorboard.base_dir": str(tmp / "tb"),
        "export.save_single_file": "true", "eval.final.enabled": "true", "eval.backend": "kdiffusion",
        "eval.height": "64", "eval.width": "64", "eval.num_inference_steps": "2",
        # prompts without their own sizes: eval.height/width hold (the example file's 1 MP renders took 15 s)
        "eval.prompts_path": str(ROOT / "data" / "quickstart_prompts.json")}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, proc


def test_a_run_shows_only_our_lines(run):
    _, proc = run
    assert "checkpoint: " in proc.stderr and "eval/final" in proc.stderr and "export: wrote" in proc.stderr
    console = proc.stderr + proc.stdout
    assert not [word for word in NOISE if word in console], console[-3000:]
    foreign = [line for line in re.split(r"[\r\n]+", console) if line and not OURS.match(line)]
    assert not foreign, foreign


def run_elsewhere(command: str, cwd: Path, **kwargs) -> subprocess.Popen:
    """A printed command as a user pastes it: a shell in another folder, no venv on PATH."""
    env = {key: value for key, value in os.environ.items() if key not in ("VIRTUAL_ENV", "PYTHONPATH")}
    return subprocess.Popen(["bash", "-c", command], cwd=cwd, env={**env, "PATH": "/usr/bin:/bin"}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, **kwargs)


def test_the_last_lines_say_what_to_do_next_and_run_as_printed(run):
    tmp, proc = run
    out = tmp / "out" / "test"
    lines = proc.stderr.rstrip().splitlines()
    start = max(i for i, line in enumerate(lines) if line.endswith("INFO next:"))
    steps = {line.split(":", 1)[0].strip(): line.split(":", 1)[1].strip() for line in lines[start + 1:]}
    assert list(steps) == ["look at the curves", "render a sample", "ComfyUI", "look at the final eval images"]
    assert steps["look at the final eval images"] == str((out / "eval" / "final" / "grid.png").resolve())
    assert steps["ComfyUI"] == (f"copy {tmp / 'out' / 'safetensors' / 'test.safetensors'} into "
                                f"ComfyUI/models/checkpoints/ and pick it in the Load Checkpoint node")
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    # "render a sample" runs as printed, and draws eval.final's pixels: eval/test_sample_cli.py (one start-up less)
    assert steps["render a sample"].startswith(f"{sys.executable} {ROOT / 'sample.py'} --model {out} ")
    board = run_elsewhere(steps["look at the curves"], elsewhere)
    try:
        lines = []
        for line in board.stdout:  # it serves until stopped: its "serving at" line is the proof
            lines.append(line)
            if " at http://" in line:
                break
        assert " at http://" in "".join(lines) and board.poll() is None, "".join(lines)[-3000:]
    finally:
        os.killpg(board.pid, signal.SIGTERM)
        board.wait(timeout=60)


def test_library_import_warnings_are_quieted_unless_the_user_asks(monkeypatch):
    """diffusers resets its logger level at import from DIFFUSERS_VERBOSITY; quiet_loggers sets its default."""
    from sdxl_ff.runtime.console import quiet_loggers
    monkeypatch.delenv("DIFFUSERS_VERBOSITY", raising=False)
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "info")
    quiet_loggers()
    assert os.environ["DIFFUSERS_VERBOSITY"] == "error"
    assert os.environ["TRANSFORMERS_VERBOSITY"] == "info"  # the user's own choice stays
    probe = ("from sdxl_ff.runtime.console import quiet_loggers; quiet_loggers(); import diffusers.utils.logging as d; "
             "print(d.get_verbosity())")
    env = {k: v for k, v in os.environ.items() if k != "DIFFUSERS_VERBOSITY"}
    level = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300).stdout.split()[-1]
    assert int(level) == 40  # logging.ERROR, after diffusers configured its root logger on import


def test_save_tiny_model_shows_only_its_line(saved_tiny):
    """issue 28.11: --save-tiny-model printed a "Writing model shards" bar per text encoder."""
    folder, proc = saved_tiny
    assert (folder / "model_index.json").is_file()
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert [re.sub(r"^\d\d:\d\d:\d\d ", "", line) for line in lines] == [f"INFO wrote the tiny SDXL to {folder}"]

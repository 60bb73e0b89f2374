"""Checkpoints and exact resume: stop anywhere, continue bit for bit; crashes and full disks lose nothing."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_cli, tiny_config, tiny_overrides
from safetensors.torch import load_file

from sdxl_ff.checkpoint import ResumeError, load_state
from train_sdxl_ff import train

N, K = 6, 3
EXACT = {"training.batch_size": "2", "training.grad_accum_steps": "2", "model.train_text_encoder_1": "true",
         "training.lr_text_encoder_1": "1e-4", "training.max_grad_norm": "1.0"}


def config(tmp: Path, name: str, steps: int = N, **extra: str):
    return tiny_config(tmp, ROOT / "data" / "images", steps=steps, base=ROOT / "config.json",
                       **{**EXACT, "run.name": name, **extra})


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for part in ("unet", "text_encoder", "text_encoder_2"):
        for file in sorted((folder / part).glob("*.safetensors")):
            out.update({f"{part}.{k}": v for k, v in load_file(file).items()})
    return out


def assert_same_tree(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_tree(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_same_run(a: Path, b: Path):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
    sa, sb = torch.load(a / "trainer_state.pt", weights_only=False), torch.load(b / "trainer_state.pt",
                                                                                weights_only=False)
    assert sa["losses"] == sb["losses"]
    assert sa["global_step"] == sb["global_step"] == N
    assert_same_tree(sa["optimizer"], sb["optimizer"], "optimizer")
    assert torch.equal(sa["noise_generator"], sb["noise_generator"])


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """N steps straight through, with a checkpoint every K steps on the way."""
    tmp = tmp_path_factory.mktemp("straight")
    result = train(config(tmp, "straight", **{"training.checkpoint_every": str(K)}))
    assert result["interrupted"] is None
    return tmp / "out" / "straight"


def test_checkpoint_layout(straight):
    ckpt = straight / "checkpoints" / f"step-{K:07d}"
    assert (ckpt / "unet").is_dir() and (ckpt / "trainer_state.pt").is_file()
    state = load_state(ckpt / "trainer_state.pt")
    assert state["global_step"] == K and len(state["losses"]) == K
    assert {"python", "numpy", "torch"} <= set(state["rng"]) and state["fingerprint"]["trained"] == \
        ["unet", "text_encoder"]


def test_resume_is_bit_exact(straight, tmp_path):
    ckpt = straight / "checkpoints" / f"step-{K:07d}"
    result = train(config(tmp_path, "resumed", **{"training.resume_from": str(ckpt)}))
    assert result["global_step"] == N
    assert_same_run(straight, tmp_path / "out" / "resumed")


def test_keep_checkpoints_prunes_oldest(tmp_path):
    train(config(tmp_path, "keep", steps=4, **{"training.checkpoint_every": "1", "training.keep_checkpoints": "2"}))
    names = sorted(p.name for p in (tmp_path / "out" / "keep" / "checkpoints").iterdir())
    assert names == ["step-0000002", "step-0000003"]


def test_changed_learning_rate_wins_and_is_logged(straight, tmp_path, caplog):
    ckpt = straight / "checkpoints" / f"step-{K:07d}"
    with caplog.at_level("INFO"):
        train(config(tmp_path, "lr", **{"training.resume_from": str(ckpt), "training.lr_unet": "5e-4"}))
    assert "unet learning rate 0.001 in the state, 0.0005 in the config: the config wins" in caplog.text
    state = torch.load(tmp_path / "out" / "lr" / "trainer_state.pt", weights_only=False)
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == [5e-4, 1e-4]


@pytest.mark.parametrize("override, message", [
    ({"model.train_text_encoder_1": "false"}, "trained modules differ: the state trained unet, text_encoder, "
                                              "this config trains unet"),
    ({"optimizer.type": "adamw"}, "optimizer differs: the state used adamw8bit, this config uses adamw"),
])
def test_mismatch_is_refused(straight, tmp_path, override, message):
    ckpt = straight / "checkpoints" / f"step-{K:07d}"
    with pytest.raises(ResumeError) as info:
        train(config(tmp_path, "bad", **{"training.resume_from": str(ckpt), **override}))
    assert message in str(info.value)


def test_other_model_is_refused(straight, tmp_path):
    from sdxl_ff.checkpoint import check_compatible
    state = load_state(straight / "checkpoints" / f"step-{K:07d}" / "trainer_state.pt")
    other = {**state["fingerprint"], "architecture": {**state["fingerprint"]["architecture"], "unet": "0" * 16}}
    with pytest.raises(ResumeError, match="the unet architecture differs"):
        check_compatible(state["fingerprint"], other, "x.pt")


def test_missing_explicit_state_is_an_error(straight, tmp_path):
    ckpt = straight / "checkpoints" / f"step-{K:07d}"
    with pytest.raises(ResumeError, match="does not exist"):
        train(config(tmp_path, "x", **{"training.resume_from": str(ckpt),
                                       "training.resume_state_path": str(tmp_path / "nope.pt")}))


def test_corrupt_state_is_an_error(tmp_path):
    path = tmp_path / "trainer_state.pt"
    path.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ResumeError, match="not a readable trainer state"):
        load_state(path)


def _popen(args):
    return subprocess.Popen([sys.executable, str(ROOT / "train_sdxl_ff.py"), *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigint_then_resume_equals_straight(straight, tmp_path):
    args = tiny_overrides(tmp_path, ROOT / "data" / "images", steps=N,
                          **{**EXACT, "run.name": "sig", "training.log_every": "1"})
    proc = _popen(args)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step 2/"):
            proc.send_signal(signal.SIGINT)
            break
    out = "".join(lines) + proc.stdout.read()
    assert proc.wait(timeout=300) == 128 + signal.SIGINT, out[-3000:]
    assert "SIGINT received" in out and "Resume with:" in out
    ckpt = next((tmp_path / "out" / "sig" / "checkpoints").iterdir())
    stopped_at = int(ckpt.name.split("-")[1])
    assert 2 <= stopped_at < N
    resumed = run_cli(*args, "--set", f"training.resume_from={ckpt}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(straight, tmp_path / "out" / "sig")


def test_sigkill_during_save_leaves_last_checkpoint_loadable(tmp_path):
    args = tiny_overrides(tmp_path, ROOT / "data" / "images", steps=40,
                          **{"run.name": "kill", "training.checkpoint_every": "2", "training.batch_size": "1"})
    proc = _popen(args)
    root = tmp_path / "out" / "kill" / "checkpoints"
    deadline, caught = time.time() + 300, None
    while proc.poll() is None and time.time() < deadline:
        partial = [p for p in root.glob(".step-*.tmp")] if root.is_dir() else []
        if partial and any(p.name.startswith("step-") for p in root.iterdir()):
            proc.send_signal(signal.SIGKILL)
            caught = partial[0]
            break
        time.sleep(0.001)
    proc.wait(timeout=60)
    assert caught is not None, "the run ended before a save could be interrupted"
    assert caught.exists(), "the kill did not land inside the save"
    complete = sorted(p for p in root.iterdir() if p.name.startswith("step-"))
    last = complete[-1]
    assert load_state(last / "trainer_state.pt")["global_step"] == int(last.name.split("-")[1])
    resumed = run_cli(*tiny_overrides(tmp_path, ROOT / "data" / "images",
                                      steps=int(last.name.split("-")[1]) + 1,
                                      **{"run.name": "kill", "training.batch_size": "1",
                                         "training.resume_from": str(last)}))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not caught.exists(), "the interrupted save's temporary folder was not cleaned up"


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_full_disk_keeps_previous_checkpoint(small_disk):
    # One tiny-SDXL checkpoint is about 20 MB: the first fits on the 40 MB disk, the second does not.
    proc = run_cli(*tiny_overrides(small_disk, ROOT / "data" / "images", steps=6,
                                   **{"run.name": "full", "training.checkpoint_every": "1"}))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "the disk is full" in proc.stderr and "is intact" in proc.stderr
    root = small_disk / "out" / "full" / "checkpoints"
    complete = sorted(p for p in root.iterdir() if p.name.startswith("step-"))
    assert complete, "no checkpoint fitted at all"
    assert load_state(complete[-1] / "trainer_state.pt")["global_step"] == len(complete)
    assert not list(root.glob(".*.tmp"))

"""Checkpoints and exact resume: stop anywhere, continue bit for bit; crashes and full disks lose nothing."""

import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    ROOT,
    pause_env,
    read_rest,
    read_until_held,
    release,
    run_in_process,
    small_disk_at,
    tiny_config,
    tiny_overrides,
)
from helpers import assert_same_folder, load, weights

from sdxl_ff.checkpoint.checkpointer import ResumeError, load_state
from sdxl_ff.data.synthetic import COLOURS, SHAPES, draw_shape
from sdxl_ff.train.divergence import DivergenceWatch
from sdxl_ff.train.lr_schedule import lr_factor
from train_sdxl_ff import train

N, K = 8, 3
# Everything that carries state across a resume at once: aspect buckets with their own batch sizes,
# accumulation, caption dropout/shuffle, random crops, EMA from step 2, a cosine LR curve, noise offset,
# Min-SNR weighting, a trained text encoder and clipping.
EXACT = {"training.batch_size": "2", "training.grad_accum_steps": "2", "model.train_text_encoder_1": "true",
         "training.lr_text_encoder_1": "1e-4", "training.max_grad_norm": "1.0",
         "data.bucket.enabled": "true", "data.bucket.divisible_by": "32",
         "data.bucket.resolutions": "[[128, 128], [96, 160], [160, 96]]",
         "data.bucket.per_resolution_batch_sizes": '{"96x160": 1, "160x96": 2}',
         "data.caption_dropout_prob": "0.2", "data.caption_shuffle_prob": "0.5", "data.caption_keep_tokens": "1",
         "data.random_crop": "true",
         "model.use_ema": "true", "model.ema_decay": "0.9", "training.ema_update_every": "1",
         "training.lr_warmup_steps": "2",
         "training.lr_scheduler": '{"type": "cosine_decay", "warmup_steps": 2, "min_factor": 0.1}',
         "training.noise_offset": "0.05", "training.snr_gamma": "5"}
# (width, height, how many): 5 square -> 2 batches of 2 (one left over, drop_last), 4 portrait -> 4 batches
# of 1, 2 landscape -> 1 batch of 2: 7 batches per epoch, so optimizer steps straddle epoch ends and K
# stops mid-epoch (after micro-batch 6 of 7), after the LR warmup, with the EMA running.
IMAGE_SET = [(128, 128, 5), (100, 170, 4), (170, 100, 2)]


def write_mixed_images(folder: Path) -> Path:
    """Images of three aspect ratios with captions of several comma-separated parts."""
    folder.mkdir(parents=True, exist_ok=True)
    names, i = list(COLOURS), 0
    for width, height, count in IMAGE_SET:
        for _ in range(count):
            shape, fg, bg = SHAPES[i % len(SHAPES)], names[i % len(names)], names[(i + 3) % len(names)]
            draw_shape(shape, fg, bg, width, height, scale=0.4 + 0.05 * i).save(folder / f"{i:02d}.png")
            (folder / f"{i:02d}.txt").write_text(f"a {fg} {shape}, on {bg}, {'small' if i % 2 else 'large'}, "
                                                 f"centred, flat colours\n")
            i += 1
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_mixed_images(tmp_path_factory.mktemp("mixed"))


def config(tmp: Path, images: Path, name: str, steps: int = N, **extra: str):
    return tiny_config(tmp, images, steps=steps, base=ROOT / "config.json", **{**EXACT, "run.name": name, **extra})


def assert_same_run(a: Path, b: Path, unlike: tuple[str, ...] = ()):
    """Final folders (EMA weights) and the step-2K checkpoints (trained weights) agree bit for bit."""
    state = load(a)
    assert state["ema_in_weights"] and state["ema"]["started_at"] == 2 and state["ema"]["num_updates"] == N - 2
    assert state["lr_factor"] == pytest.approx(0.1) and state["epoch"] == 2  # the run spans 3 epochs
    assert_same_folder(a, b, N, unlike)
    checkpoint = f"checkpoints/step-{2 * K:07d}"
    assert_same_folder(a / checkpoint, b / checkpoint, 2 * K, unlike)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, images):
    """N steps straight through, with a checkpoint every K steps on the way."""
    tmp = tmp_path_factory.mktemp("straight")
    result = train(config(tmp, images, "straight", **{"training.checkpoint_every": str(K)}))
    assert result["interrupted"] is None
    return tmp / "out" / "straight"


def test_checkpoint_layout(straight):
    ckpt = straight / "checkpoints" / f"step-{K:07d}"
    assert (ckpt / "unet").is_dir() and (ckpt / "trainer_state.pt").is_file()
    state = load_state(ckpt / "trainer_state.pt")
    assert state["global_step"] == K and len(state["losses"]) == K
    assert {"python", "numpy", "torch"} <= set(state["rng"]) and state["fingerprint"]["trained"] == \
        ["unet", "text_encoder"]


def test_stop_is_mid_epoch_and_mid_schedule(straight):
    state = load_state(straight / "checkpoints" / f"step-{K:07d}" / "trainer_state.pt")
    assert (state["epoch"], state["batch_in_epoch"]) == (0, 2 * K) and state["sampler"]["next_batch"] == 2 * K
    assert len(state["sampler"]["order"]) == 7 and {len(b) for b in state["sampler"]["order"]} == {1, 2}
    assert 0.1 < state["lr_factor"] < 1 and state["ema"]["num_updates"] == K - 2


def test_resume_is_bit_exact(straight, tmp_path, images):
    ckpt = straight / "checkpoints" / f"step-{K:07d}"
    result = train(config(tmp_path, images, "resumed", **{"training.resume_from": str(ckpt),
                                                            "training.checkpoint_every": str(K)}))
    assert result["global_step"] == N
    assert_same_run(straight, tmp_path / "out" / "resumed")


def test_full_bf16_adamw_resume_is_bit_exact(tmp_path):
    """bf16 weights with stochastic rounding and torch AdamW (fp32 moments): K steps + resume to 4 == 4 straight."""
    common = {"model.use_bf16": "true", "model.full_bf16": "true", "optimizer.type": "adamw",
              "training.batch_size": "2", "training.checkpoint_every": "2"}
    runs = {}
    for name, extra in (("straight", {}), ("resumed", {"training.resume_from": str(
            tmp_path / "out" / "straight" / "checkpoints" / "step-0000002")})):
        runs[name] = run_in_process(*tiny_overrides(tmp_path, ROOT / "data" / "images", steps=4,
                                             **{**common, "run.name": name, **extra}))
        assert runs[name].returncode == 0, runs[name].stderr[-3000:]
    assert "resume: from" in runs["resumed"].stderr
    state = load(tmp_path / "out" / "resumed")
    # one optimizer (torchao's AdamW with stochastic rounding), its moments fp32 beside the bf16 weights
    assert state["fingerprint"]["optimizer_impl"] == "torchao.optim._AdamW (fp32 state)"
    moments = [v for s in state["optimizer"]["state"].values() for k, v in s.items() if k != "step"]
    assert len(moments) == 2 * len(state["optimizer"]["state"]) and {t.dtype for t in moments} == {torch.float32}
    unet = [v for k, v in weights(tmp_path / "out" / "resumed").items() if k.startswith("unet.")]
    assert unet and all(v.dtype == torch.bfloat16 for v in unet)
    assert_same_folder(tmp_path / "out" / "straight", tmp_path / "out" / "resumed", 4)


def test_keep_checkpoints_prunes_oldest(tmp_path, images):
    train(config(tmp_path, images, "keep", steps=4,
                 **{"training.checkpoint_every": "1", "training.keep_checkpoints": "2"}))
    names = sorted(p.name for p in (tmp_path / "out" / "keep" / "checkpoints").iterdir())
    assert names == ["step-0000002", "step-0000003"]


def test_changed_learning_rate_wins_and_is_logged(straight, tmp_path, caplog, images):
    ckpt = straight / "checkpoints" / f"step-{K:07d}"
    with caplog.at_level("INFO"):
        cfg = config(tmp_path, images, "lr", **{"training.resume_from": str(ckpt), "training.lr_unet": "5e-4"})
        train(cfg)
    assert "unet learning rate 0.001 in the state, 0.0005 in the config: the config wins" in caplog.text
    state = torch.load(tmp_path / "out" / "lr" / "trainer_state.pt", weights_only=False)
    factor = lr_factor(N, cfg.training, N)  # the last step of the cosine curve: min_factor
    assert factor == 0.1 and [g["lr"] for g in state["optimizer"]["param_groups"]] == [5e-4 * factor, 1e-4 * factor]


@pytest.mark.parametrize("override, message", [
    ({"model.train_text_encoder_1": "false"}, "trained modules differ: the state trained unet, text_encoder, "
                                              "this config trains unet"),
    ({"optimizer.type": "adamw"}, "optimizer differs: the state used adamw8bit, this config uses adamw"),
])
def test_mismatch_is_refused(straight, tmp_path, images, override, message):
    ckpt = straight / "checkpoints" / f"step-{K:07d}"
    with pytest.raises(ResumeError) as info:
        train(config(tmp_path, images, "bad", **{"training.resume_from": str(ckpt), **override}))
    assert message in str(info.value)


def test_other_model_is_refused(straight, tmp_path):
    from sdxl_ff.checkpoint.checkpointer import check_compatible
    state = load_state(straight / "checkpoints" / f"step-{K:07d}" / "trainer_state.pt")
    other = {**state["fingerprint"], "architecture": {**state["fingerprint"]["architecture"], "unet": "0" * 16}}
    with pytest.raises(ResumeError, match="the unet architecture differs"):
        check_compatible(state["fingerprint"], other, "x.pt")


def test_other_model_id_on_resume_is_refused(straight, tmp_path, images, tiny_dir):
    """A resume trains resume_from's weights; a different model.id would only make the saved config lie."""
    ckpt = straight / "checkpoints" / f"step-{K:07d}"
    with pytest.raises(ResumeError) as info:
        train(config(tmp_path, images, "other", **{"training.resume_from": str(ckpt), "model.id": str(tiny_dir)}))
    assert (f"model.id is '{tiny_dir}', but the state {ckpt}/trainer_state.pt continues a run of "
            f"'builtin:tiny-sdxl'") in str(info.value)
    assert "set model.id to 'builtin:tiny-sdxl' (--set model.id=builtin:tiny-sdxl)" in str(info.value)
    assert not (tmp_path / "out" / "other" / "sdxl_ff_config.json").exists()


def test_missing_explicit_state_is_an_error(straight, tmp_path, images):
    ckpt = straight / "checkpoints" / f"step-{K:07d}"
    with pytest.raises(ResumeError, match="does not exist"):
        train(config(tmp_path, images, "x", **{"training.resume_from": str(ckpt),
                                               "training.resume_state_path": str(tmp_path / "nope.pt")}))


def test_resume_from_a_folder_without_a_model_names_the_key(tmp_path):
    from sdxl_ff.checkpoint.checkpointer import resume_state_for
    (tmp_path / "empty").mkdir()
    with pytest.raises(ResumeError, match=r"training.resume_from: .*empty holds no model \(no model_index.json\)"):
        resume_state_for(str(tmp_path / "empty"), str(tmp_path / "empty" / "trainer_state.pt"), explicit=False)


def test_corrupt_state_is_an_error(tmp_path):
    path = tmp_path / "trainer_state.pt"
    path.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ResumeError, match="not a readable trainer state"):
        load_state(path)


def _popen(args, env=None):
    return subprocess.Popen([sys.executable, str(ROOT / "train_sdxl_ff.py"), *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def test_sigint_then_resume_equals_straight(straight, tmp_path, images):
    args = tiny_overrides(tmp_path, images, steps=N, **{**EXACT, "run.name": "sig", "training.log_every": "1",
                                                        "training.checkpoint_every": str(K)})
    pause = tmp_path / "pause"
    proc = _popen(args, env=pause_env(pause, "step-2"))
    lines = read_until_held(proc.stdout, "step-2")
    proc.send_signal(signal.SIGINT)  # arrives while held after step 2: the run stops after its next step
    release(pause, "step-2")
    out = "".join(lines) + read_rest(proc, timeout=300)
    assert proc.returncode == 128 + signal.SIGINT, out[-3000:]
    assert "SIGINT received" in out and "Resume with:" in out
    ckpt = sorted((tmp_path / "out" / "sig" / "checkpoints").iterdir())[-1]  # where the SIGINT stopped
    stopped_at = int(ckpt.name.split("-")[1])
    assert 2 <= stopped_at < N
    command = out.split("Resume with:\n  ")[1].splitlines()[0]
    # the printed words, run in this process: that such a command runs as printed from another folder with no venv
    # on PATH is test_train.py::test_printed_commands_run_as_printed_from_any_folder's check (one resume_command)
    cd, folder, joined, python, script, *args = shlex.split(command)
    assert (cd, joined, python, script) == ("cd", "&&", sys.executable, str(ROOT / "train_sdxl_ff.py"))
    assert args[-1] == f"training.resume_from={ckpt}"
    resumed = run_in_process(*args, cwd=Path(folder))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # the divergence watch saw every step's loss here (log_every 1, to see step 2), every 10th straight through;
    # across the SIGINT and the resume it holds exactly what one watch fed the same values holds
    assert_same_run(straight, tmp_path / "out" / "sig", unlike=("divergence",))
    state = load(tmp_path / "out" / "sig")
    watch = DivergenceWatch("train/loss")
    for step, loss in enumerate(state["losses"], start=1):
        watch.observe(step, loss)
    assert state["divergence"]["train/loss"] == watch.state_dict()


def test_ctrl_c_outside_the_loop_says_what_is_left(straight, images, monkeypatch, capsys):
    """A KeyboardInterrupt from loading, the cache build or a second Ctrl-C: one line, no traceback, what to do."""
    import train_sdxl_ff

    def interrupted(cfg, cache_only=False, overwrite=False):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_sdxl_ff, "train", interrupted)
    tmp = straight.parent.parent
    args = tiny_overrides(tmp, images, steps=N, **{**EXACT, "run.name": "straight"})
    assert train_sdxl_ff.main(["--config", str(ROOT / "config.json"), *args]) == 130
    message = capsys.readouterr().err
    newest = straight / "checkpoints" / f"step-{2 * K:07d}"  # checkpoints at K and 2K < N
    assert f"error: interrupted (Ctrl-C); the newest checkpoint is {newest}. Resume with:" in message
    assert f"--set training.resume_from={newest}" in message and "Traceback" not in message
    fresh = tiny_overrides(tmp, images, steps=N, **{"run.name": "fresh", "data.latent_cache.enabled": "true",
                                                    "data.latent_cache.cache_dir": str(tmp / "lc")})
    assert train_sdxl_ff.main(fresh) == 130
    assert (f"error: interrupted (Ctrl-C); the cache entries already written in {tmp / 'lc'} are kept; no checkpoint "
            f"of this run exists yet: run the same command again") in capsys.readouterr().err


def test_sigkill_during_save_leaves_last_checkpoint_loadable(tmp_path):
    args = tiny_overrides(tmp_path, ROOT / "data" / "images", steps=6,
                          **{"run.name": "kill", "training.checkpoint_every": "2", "training.batch_size": "1"})
    proc = _popen(args, env=pause_env(tmp_path / "pause", "save-4"))  # held with step 4's folder written, not renamed
    read_until_held(proc.stdout, "save-4")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    root = tmp_path / "out" / "kill" / "checkpoints"
    caught = root / ".step-0000004.tmp"
    assert caught.is_dir() and any(caught.iterdir()), "the kill did not land inside the save"
    complete = sorted(p for p in root.iterdir() if p.name.startswith("step-"))
    assert [p.name for p in complete] == ["step-0000002"]
    last = complete[-1]
    assert load_state(last / "trainer_state.pt")["global_step"] == int(last.name.split("-")[1])
    resumed = run_in_process(*tiny_overrides(tmp_path, ROOT / "data" / "images",
                                             steps=int(last.name.split("-")[1]) + 1,
                                      **{"run.name": "kill", "training.batch_size": "1",
                                         "training.resume_from": str(last)}))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not caught.exists(), "the interrupted save's temporary folder was not cleaned up"


@pytest.fixture
def small_disk(tmp_path):
    with small_disk_at(tmp_path / "disk", 40) as mount:
        yield mount


def test_full_disk_keeps_previous_checkpoint(small_disk):
    # One tiny-SDXL checkpoint is about 20 MB: the first fits on the 40 MB disk, the second does not.
    proc = run_in_process(*tiny_overrides(small_disk, ROOT / "data" / "images", steps=6,
                                          **{"run.name": "full", "training.checkpoint_every": "1"}))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "the disk is full" in proc.stderr and "is intact" in proc.stderr
    root = small_disk / "out" / "full" / "checkpoints"
    complete = sorted(p for p in root.iterdir() if p.name.startswith("step-"))
    assert complete, "no checkpoint fitted at all"
    assert load_state(complete[-1] / "trainer_state.pt")["global_step"] == len(complete)
    assert not list(root.glob(".*.tmp"))


def test_loaded_weights_are_aligned(straight, tmp_path, images):
    """Weights loaded from a checkpoint folder compute like the ones that were saved: every tensor 64-byte aligned."""
    from sdxl_ff.model.parts import load_parts
    from sdxl_ff.model.trainables import CPU_ALIGNMENT, configure_modules
    from sdxl_ff.parallel.accelerator import make_accelerator
    cfg = config(tmp_path, images, "aligned")
    parts = load_parts(str(straight / "checkpoints" / f"step-{K:07d}"))
    configure_modules(parts, cfg, make_accelerator(cfg))
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(parts, name)
        assert not [k for k, t in [*module.named_parameters(), *module.named_buffers()]
                    if t.data_ptr() % CPU_ALIGNMENT], name


def test_data_loading_leaves_the_global_rng_alone(tmp_path, images):
    from sdxl_ff.data.dataset import build_data, make_loader
    cfg = config(tmp_path, images, "rng")
    train_set, sampler = build_data(cfg, 1234, 1)
    before = torch.get_rng_state()
    for _ in range(2):  # two epochs: each opens a new iterator
        assert len(list(make_loader(cfg, train_set, sampler, pin_memory=False))) == 7
    assert torch.equal(before, torch.get_rng_state())

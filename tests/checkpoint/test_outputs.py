"""What a run leaves in its output folder: only finite weights, readable by others per the umask, no leftovers."""

import errno
import os
import shlex
import shutil
import stat
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_in_process, small_disk_at, tiny_config, unet_weights

from sdxl_ff.checkpoint.checkpointer import TRAIN_SCRIPT, SaveError, load_state
from sdxl_ff.checkpoint.model_folder import non_finite_weights
from sdxl_ff.config.errors import AnomalyError, ConfigError
from sdxl_ff.data.synthetic import write_sample_set
from sdxl_ff.model.parts import build_tiny_sdxl
from train_sdxl_ff import train


@pytest.fixture(scope="module")
def small_images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("small")
    write_sample_set(folder, count=4, width=64, height=64)
    return folder


def test_non_finite_weights_are_never_saved_and_the_last_good_checkpoint_is_named(tmp_path, small_images):
    # lr 1e30 with AdamW: step 1 moves every weight by ~1e30 (finite), step 2's forward overflows and the
    # weights become NaN; training.detect_anomaly is off (the default), so only the save can notice
    cfg = tiny_config(tmp_path, small_images, steps=3, **{"training.lr_unet": "1e30", "optimizer.type": "adamw",
                                                         "optimizer.weight_decay": "0",  # lr x decay must be < 1
                                                         "training.checkpoint_every": "1", "data.size": "64"})
    with pytest.raises(AnomalyError) as info:
        train(cfg)
    output_dir = Path(cfg.training.output_dir)
    first = output_dir / "checkpoints" / "step-0000001"
    assert f"the last good state is {first / 'trainer_state.pt'}" in str(info.value)
    assert "NaN or infinite values at step 2 (618 tensor(s): unet.conv_in.weight" in str(info.value)
    assert [p.name for p in (output_dir / "checkpoints").iterdir()] == ["step-0000001"]  # no tmp folder left
    assert not (output_dir / "model_index.json").exists()


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["umask022", "umask077"])
def test_outputs_get_the_modes_the_umask_gives_a_plain_file(tmp_path, small_images, tiny_dir, umask):
    # another account (a web UI, a shared ComfyUI) reads the model when umask 022 allows it; 077 keeps it private
    cfg = tiny_config(tmp_path, small_images, steps=2, **{
        "model.id": str(tiny_dir), "data.size": "64", "training.checkpoint_every": "1",
        "data.latent_cache.enabled": "true", "data.latent_cache.cache_dir": str(tmp_path / "out" / "cache"),
        "export.save_single_file": "true", "export.half_precision": "false"})
    previous = os.umask(umask)
    try:
        train(cfg)
    finally:
        os.umask(previous)
    root = tmp_path / "out"
    found = {p.relative_to(root).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*")}
    assert "test/unet/diffusion_pytorch_model.safetensors" in found and "safetensors/test.safetensors" in found
    assert "test/checkpoints/step-0000001/trainer_state.pt" in found and "test/lr_schedule.png" in found
    assert any(name.startswith("cache/") and name.endswith(".safetensors") for name in found)
    wrong = {name: oct(mode) for name, mode in found.items()
             if mode != (0o777 if (root / name).is_dir() else 0o666) & ~umask}
    assert wrong == {}
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o777 & ~umask


def test_save_check_benchmark_runs_in_small_mode(capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_save_check
    rows = bench_save_check.main(["--params-m", "2", "--device", "cpu"])
    assert [r["dtype"] for r in rows] == ["float32", "bfloat16"] and all(r["found"] == 0 for r in rows)
    assert "check/save" in capsys.readouterr().out


def test_non_finite_weights_names_exactly_the_bad_tensors():
    module = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    with torch.no_grad():
        module[0].weight.fill_(3e38)  # finite, though its sum overflows: must not be reported
        assert non_finite_weights({"unet": module}) == []
        module[1].bias[2] = float("nan")
        module[0].weight[0, 0] = float("-inf")
    assert non_finite_weights({"unet": module}) == ["unet.0.weight", "unet.1.bias"]


# --------------------------------------------------------------------------- the final save (issue 28.1)

def links_fail_below(folder: Path, monkeypatch) -> None:
    """Hard-linking anything below `folder` fails with EXDEV (as across filesystems), so it is copied."""
    real_link = os.link

    def cross_device(src, dst, **kw):
        if str(src).startswith(str(folder)):
            raise OSError(errno.EXDEV, "Invalid cross-device link", str(src), None, str(dst))
        return real_link(src, dst, **kw)
    monkeypatch.setattr(os, "link", cross_device)


@pytest.fixture
def shm_folder(tmp_path, monkeypatch) -> Path:
    """A folder on /dev/shm (a tmpfs: another filesystem than tmp_path); where /dev/shm is the same filesystem,
    hard links into it fail with EXDEV as they would across filesystems."""
    shm = Path("/dev/shm")
    folder = Path(tempfile.mkdtemp(dir=shm)) if shm.is_dir() and os.access(shm, os.W_OK) else tmp_path / "shm"
    folder.mkdir(exist_ok=True)
    if folder.stat().st_dev == tmp_path.stat().st_dev:
        links_fail_below(folder, monkeypatch)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_final_save_into_a_folder_with_a_symlink_to_another_filesystem(tmp_path, small_images, shm_folder):
    # issue 28.1: `OUT/NAME/logs -> /dev/shm/x` failed the final save with EXDEV after the last step
    (shm_folder / "notes.txt").write_text("kept")
    cfg = tiny_config(tmp_path, small_images, steps=2, **{"data.size": "64"})
    output_dir = Path(cfg.training.output_dir)
    output_dir.mkdir(parents=True)
    (output_dir / "logs").symlink_to(shm_folder)
    train(cfg)
    assert (output_dir / "model_index.json").is_file() and (output_dir / "trainer_state.pt").is_file()
    assert os.readlink(output_dir / "logs") == str(shm_folder)  # still the user's symlink, not a copy
    assert (shm_folder / "notes.txt").read_text() == "kept"
    assert sorted(p.name for p in output_dir.parent.iterdir()) == ["test"]


def test_full_disk_while_carrying_over_keeps_the_trained_model(tmp_path, small_images, monkeypatch):
    # The checkpoint (~20 MB) and the final model (~20 MB) fit on 50 MB; copying the checkpoint into the new
    # folder (it cannot be hard-linked) does not. The final model must survive, named, with a way on.
    with small_disk_at(tmp_path / "disk", 50) as disk:
        cfg = tiny_config(disk, small_images, steps=2, **{"data.size": "64", "training.checkpoint_every": "1"})
        output_dir = Path(cfg.training.output_dir)
        links_fail_below(output_dir / "checkpoints", monkeypatch)
        with pytest.raises(SaveError) as info:
            train(cfg)
        kept = output_dir.with_name("test-final-step-0000002")
        message = str(info.value)
        assert info.value.errno == errno.ENOSPC and info.value.exit_code == 2
        assert message.startswith(f"could not put the final output in place in {output_dir}: No space left on "
                                  f"device (errno 28 ENOSPC")
        assert f"The trained model is complete in {kept} (a Diffusers folder with its trainer state)" in message
        assert "\n" not in message and f"--set training.resume_from={kept}" in message
        assert "--set training.num_steps=4" in message
        assert load_state(kept / "trainer_state.pt")["global_step"] == 2
        assert sorted(p.name for p in kept.iterdir()) == sorted(
            ["model_index.json", "sdxl_ff_config.json", "trainer_state.pt", "unet", "vae", "text_encoder",
             "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"])
        assert sorted(p.name for p in disk.joinpath("out").iterdir()) == ["test", "test-final-step-0000002"]
        assert [p.name for p in (output_dir / "checkpoints").iterdir()] == ["step-0000001"]
        # the named command continues from the kept model
        monkeypatch.undo()
        shutil.rmtree(output_dir / "checkpoints")
        further = tiny_config(disk, small_images, steps=3, **{"data.size": "64", "training.resume_from": str(kept)})
        assert train(further)["global_step"] == 3


def test_full_disk_writing_the_final_model_names_the_cause_and_the_checkpoint(tmp_path, small_images, monkeypatch):
    (tmp_path / "a-file").write_text("")
    rescue = tmp_path / "a-file" / "rescue"  # the rescue folder cannot be made either
    monkeypatch.setenv("SDXL_FF_RESCUE_DIR", str(rescue))
    with small_disk_at(tmp_path / "disk", 30) as disk:  # the checkpoint fits, the final model next to it not
        cfg = tiny_config(disk, small_images, steps=2, **{"data.size": "64", "training.checkpoint_every": "1"})
        with pytest.raises(SaveError) as info:
            train(cfg)
        output_dir = Path(cfg.training.output_dir)
        checkpoint = output_dir / "checkpoints" / "step-0000001"
        message = str(info.value)
        assert info.value.errno == errno.ENOSPC and "\n" not in message
        assert message.startswith(f"could not write the final output {output_dir}: No space left on device in "
                                  f"{output_dir.parent} (SafetensorError: ")
        assert info.value.exit_code == 2
        target = rescue / "sdxl-ff-rescue" / "test-step-0000002"
        assert (f"(errno 28 ENOSPC); nor a rescue copy in {target}: Not a directory (errno 20 ENOTDIR: "
                f"{target.parent}) (set SDXL_FF_RESCUE_DIR to a folder with room); what was there before is intact, "
                f"and so is every checkpoint") in message
        assert f"finish from the newest ({checkpoint}) with: " in message
        assert f"--set training.resume_from={checkpoint}" in message
        assert sorted(p.name for p in output_dir.parent.iterdir()) == ["test"]


def further_args(message: str) -> list[str]:
    """The arguments of the command a message ends with (`train it further with: cd DIR && python SCRIPT ...`)."""
    words = shlex.split(message.split("train it further with: ", 1)[1])
    assert words[:3] == ["cd", str(ROOT), "&&"] and words[4] == str(TRAIN_SCRIPT)
    return words[5:]


def test_full_disk_with_no_checkpoint_rescues_the_final_model_to_another_disk(tmp_path, small_images, monkeypatch):
    # issue 28.1: with the default checkpoint_every null, a full disk at the final save lost the whole run
    rescue = tmp_path / "rescue"
    monkeypatch.setenv("SDXL_FF_RESCUE_DIR", str(rescue))
    ema = {"data.size": "64", "model.use_ema": "true", "training.ema_update_every": "1", "model.ema_decay": "0.5"}
    normal = tiny_config(tmp_path / "normal", small_images, steps=1, **ema)
    train(normal)
    saved = Path(normal.training.output_dir)
    with small_disk_at(tmp_path / "disk", 16) as disk:  # the weights (13.5 MB) fit, with the trainer state not
        cfg = tiny_config(disk, small_images, steps=1, **ema)
        with pytest.raises(SaveError) as info:
            train(cfg)
        output_dir = Path(cfg.training.output_dir)
        assert sorted(p.name for p in output_dir.parent.iterdir()) == ["test"]  # nothing half-written left
        assert not (output_dir / "model_index.json").exists()
    rescued = rescue / "sdxl-ff-rescue" / "test-step-0000001"
    message = str(info.value)
    assert info.value.errno == errno.ENOSPC and info.value.exit_code == 2 and "\n" not in message
    assert message.startswith(f"could not write the final output {output_dir}: No space left on device in "
                              f"{output_dir.parent} (")
    assert (f"(errno 28 ENOSPC). The trained model is complete in {rescued} (a Diffusers folder with its trainer "
            f"state, written there instead; SDXL_FF_RESCUE_DIR chooses the place): use it from there, or, once "
            f"the cause is fixed, train it further with: ") in message
    assert sorted(p.name for p in rescued.iterdir()) == sorted(p.name for p in saved.iterdir() if p.suffix != ".png")
    assert [p.name for p in rescued.parent.iterdir()] == [rescued.name]  # no temporary folder left
    # the EMA weights, as the normal final save writes them, bit for bit
    expected, found = unet_weights(saved), unet_weights(rescued)
    assert expected.keys() == found.keys() and all(torch.equal(expected[k], found[k]) for k in expected)
    state, saved_state = load_state(rescued / "trainer_state.pt"), load_state(saved / "trainer_state.pt")
    assert state["global_step"] == 1 and state["ema_in_weights"] is True
    shadow, saved_shadow = state["ema"]["shadow"], saved_state["ema"]["shadow"]
    assert shadow.keys() == saved_shadow.keys() and all(torch.equal(shadow[k], saved_shadow[k]) for k in shadow)
    # the disk is fixed (unmounted); the printed command continues from the rescued model
    args = further_args(message)
    assert f"training.resume_from={rescued}" in args and "training.num_steps=2" in args
    done = run_in_process(*args)
    assert done.returncode == 0, done.stderr[-2000:]
    assert load_state(output_dir / "trainer_state.pt")["global_step"] == 2


def test_rescue_folder_without_room_is_refused_before_writing(tmp_path, small_images, monkeypatch):
    # a full /tmp (the default rescue place) fails at once, with the sizes; both places are named with their causes
    monkeypatch.delenv("SDXL_FF_RESCUE_DIR", raising=False)
    with small_disk_at(tmp_path / "disk", 16) as disk, small_disk_at(tmp_path / "small-tmp", 4) as small_tmp:
        monkeypatch.setattr(tempfile, "tempdir", str(small_tmp))  # what tempfile.gettempdir() answers
        cfg = tiny_config(disk, small_images, steps=1, **{"data.size": "64"})
        with pytest.raises(SaveError) as info:
            train(cfg)
        output_dir = Path(cfg.training.output_dir)
        target = small_tmp / "sdxl-ff-rescue" / "test-step-0000001"
        message = str(info.value)
        assert info.value.errno == errno.ENOSPC and info.value.exit_code == 2 and "\n" not in message
        assert message.startswith(f"could not write the final output {output_dir}: No space left on device in ")
        assert (f"(errno 28 ENOSPC); nor a rescue copy in {target}: No space left on device: 4.0 MB free, the model "
                f"and its trainer state need ") in message
        assert (f" MB (errno 28 ENOSPC: {target.parent}) (set SDXL_FF_RESCUE_DIR to a folder with room); what was "
                f"there before is intact, but this run wrote no checkpoint") in message
        assert list(target.parent.iterdir()) == []  # refused before writing anything


def test_the_rescue_folder_is_the_temporary_folder_unless_set(tmp_path, monkeypatch):
    from sdxl_ff.checkpoint.model_folder import rescue_root
    monkeypatch.delenv("SDXL_FF_RESCUE_DIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    assert rescue_root() == tmp_path / "tmp" / "sdxl-ff-rescue"
    monkeypatch.setenv("SDXL_FF_RESCUE_DIR", str(tmp_path / "big"))
    assert rescue_root() == tmp_path / "big" / "sdxl-ff-rescue"


def test_start_up_says_what_the_final_save_will_copy(tmp_path, shm_folder, monkeypatch, caplog):
    from sdxl_ff.checkpoint.model_folder import check_final_save
    output_dir = tmp_path / "out" / "run"
    (output_dir / "notes").mkdir(parents=True)
    (output_dir / "notes" / "a.txt").write_bytes(b"x" * 2**20)
    (output_dir / "logs").symlink_to(shm_folder)  # carried as a symlink: nothing to copy
    (shm_folder / "big").write_bytes(b"y" * 2**21)
    with caplog.at_level("INFO", logger="sdxl_ff"):
        check_final_save(output_dir)
    assert "final save" not in caplog.text  # hard links work here, and the symlink is not followed

    def no_links(src, dst, **kw):  # a filesystem without hard links
        raise OSError(errno.EPERM, "Operation not permitted", str(src), None, str(dst))
    monkeypatch.setattr(os, "link", no_links)
    with caplog.at_level("INFO", logger="sdxl_ff"):
        check_final_save(output_dir)
    assert (f"final save: 1 file(s) in {output_dir} (1.0 MB, e.g. {output_dir / 'notes' / 'a.txt'}) cannot be "
            f"hard-linked into the new folder (Operation not permitted (errno 1 EPERM: ") in caplog.text
    assert "they will be copied" in caplog.text and not list(output_dir.parent.glob(".link-probe*"))


def test_a_disk_too_small_for_the_final_model_is_refused_before_training(tmp_path, small_images):
    with small_disk_at(tmp_path / "disk", 8) as disk:  # the tiny SDXL's weights take 13.4 MB
        cfg = tiny_config(disk, small_images, steps=2, **{"data.size": "64"})
        with pytest.raises(ConfigError) as info:
            train(cfg)
        assert str(info.value).startswith(f"training.output_dir: {cfg.training.output_dir} has ")
        tiny = build_tiny_sdxl()
        modules = (tiny.unet, tiny.vae, tiny.text_encoder, tiny.text_encoder_2)
        weights = sum(t.numel() * t.element_size() for m in modules for t in (*m.parameters(), *m.buffers()))
        assert f"MB free, but the final save alone needs at least {weights / 2**20:.1f} MB (the model's weights;" \
            in str(info.value) and weights > 8 * 2**20
        assert not Path(cfg.training.output_dir).exists()

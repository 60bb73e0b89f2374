"""What a run leaves in its output folder: only finite weights, readable by others per the umask, no leftovers."""

import os
import stat
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, tiny_config

from sdxl_ff.stability import AnomalyError, non_finite_weights
from sdxl_ff.synthetic import write_sample_set
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

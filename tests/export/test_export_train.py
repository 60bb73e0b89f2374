"""The trainer's export block and single-file checkpoints as model.id, end to end through the CLI."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import (
    ROOT,
    pause_env,
    read_rest,
    read_until_held,
    run_in_process,
    tiny_config,
    tiny_overrides,
    unet_weights,
)
from safetensors.torch import load_file, save_file

from sdxl_ff.config.errors import ConfigError
from sdxl_ff.config.load import load_config
from sdxl_ff.export.single_file import convert_folder
from sdxl_ff.model.parts import build_tiny_sdxl, load_parts


@pytest.fixture(scope="module")
def tiny_file(tiny_dir):
    path = tiny_dir.parent / "tiny.safetensors"
    convert_folder(tiny_dir, path)
    return path


def first_loss(out_dir):
    return torch.load(out_dir / "trainer_state.pt", weights_only=False)["losses"][0]


@pytest.fixture(scope="module")
def from_folder(tmp_path_factory, tiny_dir, sample_dir):
    """One step from the Diffusers folder, run from another directory, exporting an fp32 single file."""
    tmp = tmp_path_factory.mktemp("folder_run")
    proc = run_in_process("--config", str(ROOT / "config.json"), *tiny_overrides(tmp, sample_dir, steps=1, **{
        "model.id": str(tiny_dir), "export.save_single_file": "true", "export.half_precision": "false"}),
        cwd=tmp)  # ./converttosdxl.py is found in the repository when not in the working directory
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, proc


def test_trainer_exports_single_file_at_derived_path(from_folder):
    tmp, proc = from_folder
    path = tmp / "out" / "safetensors" / "test.safetensors"  # {checkpoint_root}/{run.name}.safetensors
    assert path.is_file() and os.stat(path).st_mode & 0o777 == 0o644
    assert "converttosdxl.py --model_path" in proc.stderr and "--use_safetensors" in proc.stderr
    trained = unet_weights(tmp / "out" / "test")
    exported = load_file(path)
    assert torch.equal(exported["model.diffusion_model.input_blocks.0.0.weight"], trained["conv_in.weight"])
    assert torch.equal(exported["model.diffusion_model.label_emb.0.2.bias"], trained["add_embedding.linear_2.bias"])


def test_training_from_single_file_matches_the_folder(from_folder, tiny_file, tiny_dir, sample_dir, tmp_path):
    folder_tmp, _ = from_folder
    proc = run_in_process(*tiny_overrides(tmp_path, sample_dir, steps=1, **{
        "model.id": str(tiny_file), "model.config_dir": str(tiny_dir)}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "single-file checkpoint" in proc.stderr
    assert first_loss(tmp_path / "out" / "test") == first_loss(folder_tmp / "out" / "test")


def test_failing_converter_keeps_the_diffusers_output(tmp_path, tiny_dir, sample_dir, capfd):
    script = tmp_path / "broken_converter.py"
    script.write_text("import sys\nprint('converter: out of disk', file=sys.stderr)\nsys.exit(3)\n")
    proc = run_in_process(*tiny_overrides(tmp_path, sample_dir, steps=1, **{
        "model.id": str(tiny_dir), "export.save_single_file": "true", "export.converter_script": str(script),
        "export.extra_args": '["--extra", "1"]'}))
    assert proc.returncode == 2
    assert "the converter failed (exit code 3)" in proc.stderr and "is complete and stays" in proc.stderr
    assert "--extra 1" in proc.stderr
    # the converter's own process writes to the real stderr (file descriptor 2), part of what the user sees
    assert "converter: out of disk" in capfd.readouterr().err
    assert (tmp_path / "out" / "test" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_missing_converter_is_refused_at_start(tmp_path, sample_dir):
    proc = run_in_process(*tiny_overrides(tmp_path, sample_dir, steps=1, **{
        "export.save_single_file": "true", "export.converter_script": "nowhere/convert.py"}))
    assert proc.returncode == 2
    assert "export.converter_script: 'nowhere/convert.py' not found" in proc.stderr
    assert not (tmp_path / "out" / "test").exists()


def test_checkpoint_suffix_follows_use_safetensors(tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"run": {"name": "r", "output_root": "o"}, "training": {"num_steps": 1},
                                  "model": {"train_text_encoder_1": False},
                                  "export": {"save_single_file": True, "use_safetensors": False}}))
    assert load_config(config).export.checkpoint_path == "o/safetensors/r.ckpt"
    with pytest.raises(ConfigError, match=r"export.checkpoint_path 'x.safetensors' does not match "
                                          r"export.use_safetensors false"):
        load_config(config, ["export.checkpoint_path=x.safetensors"])


# --------------------------------------------------------------------------- single file as model.id

def test_single_file_loads_bit_identical(tiny_file, tiny_dir):
    parts, ref = load_parts(str(tiny_file), config_dir=str(tiny_dir)), load_parts(str(tiny_dir))
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(parts, name).state_dict(), getattr(ref, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert parts.unet.dtype == torch.float32 and parts.scheduler.config.prediction_type == "epsilon"


def test_ckpt_loads_too(tiny_dir, tmp_path):
    convert_folder(tiny_dir, tmp_path / "tiny.ckpt", half=True, use_safetensors=False)
    parts = load_parts(str(tmp_path / "tiny.ckpt"), config_dir=str(tiny_dir))
    ref = build_tiny_sdxl(0).unet.conv_in.weight
    assert parts.unet.dtype == torch.float32 and torch.equal(parts.unet.conv_in.weight, ref.half().float())


def test_v_pred_marker_sets_the_scheduler(tiny_file, tiny_dir, tmp_path):
    path = tmp_path / "v.safetensors"
    save_file({**load_file(tiny_file), "v_pred": torch.tensor([]), "ztsnr": torch.tensor([])}, path)
    scheduler = load_parts(str(path), config_dir=str(tiny_dir)).scheduler.config
    assert scheduler.prediction_type == "v_prediction" and scheduler.rescale_betas_zero_snr is True


def test_single_file_without_config_dir_says_what_to_do(tiny_file):
    with pytest.raises(ConfigError) as info:
        load_parts(str(tiny_file))
    assert "Set model.config_dir to a local Diffusers SDXL folder" in str(info.value)
    assert "--save-tiny-model" in str(info.value)


def test_sd15_single_file_is_refused(tmp_path):
    path = tmp_path / "sd15.safetensors"
    save_file({"cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": torch.zeros(77, 8),
               "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, path)
    with pytest.raises(ConfigError, match=r"not an SDXL single-file checkpoint \(an SD 1.x/2.x checkpoint\)"):
        load_parts(str(path), config_dir=str(tmp_path))


def test_half_written_single_file_is_refused(tiny_file, tmp_path):
    path = tmp_path / "half.safetensors"
    data = tiny_file.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match=r"half.safetensors cannot be read .*incomplete or damaged"):
        load_parts(str(path), config_dir=str(tmp_path))


def test_config_dir_must_be_a_diffusers_folder(tiny_file, tmp_path):
    shutil.copy(tiny_file, tmp_path / "m.safetensors")
    with pytest.raises(ConfigError, match=r"model.config_dir: .* is not a Diffusers SDXL folder"):
        load_parts(str(tmp_path / "m.safetensors"), config_dir=str(tmp_path))


# --------------------------------------------------------------------------- export.use_safetensors decides the format

def file_format(path) -> str:
    """'safetensors' (8-byte header length, then a JSON header) or 'torch' (torch.save's zip archive)."""
    head = path.read_bytes()[:9]
    if head[:2] == b"PK":
        return "torch"
    return "safetensors" if head[8:9] == b"{" else "unknown"


@pytest.mark.parametrize("use_safetensors, name, expected", [(True, "model.sft", "safetensors"),
                                                             (False, "model.bin", "torch")])
def test_use_safetensors_decides_the_format_of_any_suffix_that_fits(tiny_dir, tmp_path, use_safetensors, name,
                                                                    expected):
    import sys

    import converttosdxl
    from sdxl_ff.config.schema import ExportConfig
    from sdxl_ff.export.export_step import converter_command
    target = tmp_path / name  # suffixes ComfyUI reads as that format: only the flag decides
    export = ExportConfig(save_single_file=True, checkpoint_path=str(target), use_safetensors=use_safetensors,
                          half_precision=False)
    # the trainer's converter command, run in this process (the trainer starting it as its own process is
    # proven by the runs above and test_ctrl_c_during_the_export_says_the_model_is_saved)
    command = converter_command(export, tiny_dir)
    assert command[:2] == [sys.executable, str(ROOT / "converttosdxl.py")]
    assert converttosdxl.main(command[2:]) == 0
    assert file_format(target) == expected
    if expected == "torch":
        state = torch.load(target, weights_only=True)["state_dict"]
        assert torch.equal(state["model.diffusion_model.input_blocks.0.0.weight"],
                           unet_weights(tiny_dir)["conv_in.weight"])


def test_flags_for_the_bundled_and_a_classic_converter(tmp_path):
    from sdxl_ff.config.schema import ExportConfig
    from sdxl_ff.export.export_step import converter_command
    off = ExportConfig(checkpoint_path="m.bin", use_safetensors=False)
    assert "--no-safetensors" in converter_command(off, "folder")
    assert "--overwrite" in converter_command(off, "folder")  # the trainer decided at start-up (check_fresh_output)
    assert "--use_safetensors" in converter_command(ExportConfig(checkpoint_path="m.bin"), "folder")
    classic = tmp_path / "convert_diffusers_to_original_sdxl.py"
    classic.write_text("")
    command = converter_command(ExportConfig(checkpoint_path="m.ckpt", use_safetensors=False,
                                             converter_script=str(classic)), "folder")
    assert "--no-safetensors" not in command and "--use_safetensors" not in command  # classic: absent = pickle
    assert "--overwrite" not in command  # not an argument of the classic script


def test_export_path_inside_the_output_folder_or_over_an_earlier_file_is_refused_at_start_up(tmp_path, sample_dir):
    from sdxl_ff.checkpoint.model_folder import check_fresh_output
    from sdxl_ff.export.export_step import check_export
    target = tmp_path / "out" / "test" / "m.safetensors"
    inside = tiny_config(tmp_path, sample_dir, **{"export.save_single_file": "true",
                                                  "export.checkpoint_path": str(target)})
    with pytest.raises(ConfigError) as info:
        check_export(inside)
    assert str(info.value) == (f"export.checkpoint_path: {target} lies inside "
                               f"training.output_dir {tmp_path / 'out' / 'test'}, the model folder it is converted "
                               f"from; give a path outside it (the default is "
                               f"run.checkpoint_root/<run.name>.safetensors)")
    cfg = tiny_config(tmp_path, sample_dir, **{"export.save_single_file": "true"})
    check_export(cfg)
    earlier = Path(cfg.export.checkpoint_path)
    earlier.parent.mkdir(parents=True)
    earlier.write_bytes(b"an earlier run's model")
    with pytest.raises(ConfigError, match=rf"export.checkpoint_path: {earlier} already exists \(an earlier run's "
                                          r"single file\); this run would replace it .* or pass --overwrite$"):
        check_fresh_output(cfg)
    check_fresh_output(cfg, overwrite=True)


@pytest.mark.parametrize("path, flag", [("x.safetensors", "false"), ("x.ckpt", "true"), ("x.bin", "true"),
                                        ("x.txt", "true"), ("x.txt", "false"), ("x", "false")])
def test_suffix_contradicting_use_safetensors_is_refused(tmp_path, path, flag):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"run": {"name": "r"}, "training": {"num_steps": 1},
                                  "model": {"train_text_encoder_1": False}}))
    with pytest.raises(ConfigError) as info:
        load_config(config, [f"export.checkpoint_path={path}", f"export.use_safetensors={flag}"])
    assert f"export.checkpoint_path '{path}' does not match export.use_safetensors {flag}" in str(info.value)
    fits = ".safetensors or .sft" if flag == "true" else ".ckpt or .pt or .pth or .bin"
    assert f"end it in {fits} (ComfyUI and A1111 read the format from the suffix)" in str(info.value)


def test_ctrl_c_during_the_export_says_the_model_is_saved(tmp_path, sample_dir):
    """Ctrl-C in the terminal (SIGINT to the foreground process group) while the converter runs."""
    import signal
    import subprocess
    import sys
    args = tiny_overrides(tmp_path, sample_dir, steps=1, **{"export.save_single_file": "true"})
    # held where the trainer has started the converter and the converter before it writes: the export is running
    env = pause_env(tmp_path / "pause", "export", "convert")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_sdxl_ff.py"), *args], cwd=ROOT, text=True, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    lines = read_until_held(proc.stdout, "export")
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
    out = "".join(lines) + read_rest(proc, timeout=120)
    assert proc.returncode == 130, out[-3000:]
    target = tmp_path / "out" / "safetensors" / "test.safetensors"
    assert "Traceback" not in out and not target.exists() and not list(target.parent.glob(".*.tmp")), out[-3000:]
    assert (f"error: interrupted (Ctrl-C) during the single-file export. Training finished and the model is saved: "
            f"{tmp_path / 'out' / 'test'} is the complete Diffusers folder") in out
    assert "run the same command again to start over" not in out
    command = out.split("Finish the export with:\n  ")[1].splitlines()[0]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    finished = subprocess.run(["bash", "-c", command], cwd=elsewhere, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PATH": "/usr/bin:/bin"})
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert torch.equal(load_file(target)["model.diffusion_model.input_blocks.0.0.weight"],
                       unet_weights(tmp_path / "out" / "test")["conv_in.weight"].half())

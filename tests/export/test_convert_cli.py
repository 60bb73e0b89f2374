"""converttosdxl.py as a hostile user runs it: unusable output paths and fp16 overflow are one-line errors."""

import contextlib
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file, save_file

import converttosdxl
from sdxl_ff.export import single_file as export


def convert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "converttosdxl.py"), *args], capture_output=True, text=True,
                          timeout=300)


@contextlib.contextmanager
def read_only_folder(folder):
    """A folder nobody can create files in: a read-only tmpfs as root (root ignores modes), else mode 0555."""
    folder.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)],
                                                   capture_output=True).returncode == 0
    if not mounted:
        if os.geteuid() == 0:
            pytest.skip("root cannot mount a read-only tmpfs here")
        folder.chmod(0o555)
    try:
        yield folder
    finally:
        if mounted:
            subprocess.run(["umount", "--lazy", str(folder)], check=False)
        else:
            folder.chmod(0o755)


def no_conversion(monkeypatch):
    """Make any conversion work fail loudly, to show that the path is refused before it starts."""
    def refuse(*args, **kwargs):
        raise AssertionError("conversion started before the output path was checked")
    monkeypatch.setattr(export, "read_folder", refuse)


def test_output_path_that_is_a_folder_is_a_one_line_error(tmp_path, tiny_dir, monkeypatch, capsys):
    no_conversion(monkeypatch)
    assert converttosdxl.main(["--model_path", str(tiny_dir), "--checkpoint_path", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --checkpoint_path {tmp_path} is a folder; give a file name, e.g. " \
                  f"{tmp_path / 'model.safetensors'}"
    proc = convert("--model_path", str(tiny_dir), "--checkpoint_path", str(tmp_path))  # as a user runs it
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [err], proc.stderr


def test_output_in_a_folder_that_cannot_take_files_is_a_one_line_error(tmp_path, tiny_dir, monkeypatch, capsys):
    with read_only_folder(tmp_path / "ro") as folder:
        target = folder / "model.safetensors"
        no_conversion(monkeypatch)
        assert converttosdxl.main(["--model_path", str(tiny_dir), "--checkpoint_path", str(target)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: --checkpoint_path {target}: cannot create files in {folder} (")
        assert err.endswith("); choose a writable folder") and "\n" not in err
        assert os.listdir(folder) == []
    missing = tmp_path / "nowhere" / "model.safetensors"
    assert converttosdxl.main(["--model_path", str(tiny_dir), "--checkpoint_path", str(missing)]) == 2
    assert capsys.readouterr().err.strip() == (f"error: --checkpoint_path {missing}: the folder {missing.parent} "
                                               f"does not exist; create it first")


def test_half_refuses_values_beyond_fp16_unless_allowed(tmp_path, tiny_dir, capsys, caplog):
    folder = tmp_path / "big"
    shutil.copytree(tiny_dir, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state["conv_in.weight"][0, 0, 0, :2] = torch.tensor([1e5, -7e4])  # two values fp16 cannot hold
    state["conv_out.bias"][0] = 65504.0  # fp16's largest: fine
    save_file(state, weights)
    out = tmp_path / "big.safetensors"
    # main() in this process: the command line itself is run as a user runs it in the first test of this file
    args = ["--model_path", str(folder), "--checkpoint_path", str(out), "--half"]
    assert converttosdxl.main(args) == 2 and not out.exists()
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        "error: 2 value(s) in 1 tensor(s) exceed fp16's range (±65504) and would become inf with --half; export "
        "without --half (fp32), or pass --allow-overflow to accept the infs"), err
    with caplog.at_level("WARNING", logger="sdxl_ff"):
        assert converttosdxl.main([*args, "--allow-overflow"]) == 0
    assert "2 value(s) in 1 tensor(s) exceed fp16's range" in caplog.text and "--allow-overflow" in caplog.text
    written = load_file(out)["model.diffusion_model.input_blocks.0.0.weight"]
    assert written.dtype == torch.float16 and written[0, 0, 0, :2].tolist() == [float("inf"), float("-inf")]
    assert export.fp16_overflow({"a": torch.tensor([65504.0, float("inf"), 1e6]), "b": torch.ones(2)}) == (1, 1)


def test_output_inside_the_model_folder_is_refused_even_with_overwrite(tiny_dir, monkeypatch, capsys):
    # issue 28.2: this exited 0 and replaced the trained UNet; resuming the folder then crashed on meta tensors
    target = tiny_dir / "unet" / "diffusion_pytorch_model.safetensors"
    before = target.read_bytes()
    no_conversion(monkeypatch)
    for extra in ([], ["--overwrite"]):
        assert converttosdxl.main(["--model_path", str(tiny_dir), "--checkpoint_path", str(target), *extra]) == 2
        assert capsys.readouterr().err.strip() == (
            f"error: --checkpoint_path {target} lies inside the model folder being converted ({tiny_dir}), where it "
            f"would replace or add to the model's own files; write it outside, e.g. "
            f"{tiny_dir.parent / 'tiny.safetensors'}")
    assert target.read_bytes() == before


def test_existing_output_is_replaced_only_with_overwrite_and_atomically(tmp_path, tiny_dir, capsys):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"an earlier export")
    args = ["--model_path", str(tiny_dir), "--checkpoint_path", str(target)]
    assert converttosdxl.main(args) == 2
    assert capsys.readouterr().err.strip() == (f"error: --checkpoint_path {target} already exists; pass --overwrite "
                                               f"to replace it, or choose another name")
    assert target.read_bytes() == b"an earlier export"
    # what a killed conversion left (write_atomic(shared=True) names its writer) goes; a live writer's file stays
    from sdxl_ff.runtime.files import writer_tag
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    machine = writer_tag().split("-")[0]
    killed = tmp_path / f".model.safetensors.{machine}-{int(dead.stdout)}.abcd1234.tmp"
    live = tmp_path / f".model.safetensors.{writer_tag()}.efgh5678.tmp"
    killed.write_bytes(b"half")
    live.write_bytes(b"being written")
    assert converttosdxl.main([*args, "--overwrite"]) == 0
    assert torch.equal(load_file(target)["model.diffusion_model.input_blocks.0.0.weight"],
                       load_file(tiny_dir / "unet" / "diffusion_pytorch_model.safetensors")["conv_in.weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, live.name])


@pytest.mark.parametrize("name, flags, message", [
    ("model.txt", [], "the suffix .txt names no checkpoint format; end it in .safetensors (or .ckpt with "
                      "--no-safetensors)"),
    ("model", [], "a name without a suffix names no checkpoint format; end it in .safetensors (or .ckpt with "
                  "--no-safetensors)"),
    ("model.txt", ["--use_safetensors"], "--use_safetensors writes a safetensors file, but a file ending in .txt is "
                                         "not loaded by ComfyUI and A1111; end it in .safetensors or .sft"),
    ("model.ckpt", ["--use_safetensors"], "--use_safetensors writes a safetensors file, but a file ending in .ckpt "
                                          "is read as pickle by ComfyUI and A1111; end it in .safetensors or .sft"),
    ("model.safetensors", ["--no-safetensors"], "--no-safetensors writes a pickle file, but a file ending in "
                                                ".safetensors is read as safetensors by ComfyUI and A1111; end it in "
                                                ".ckpt or .pt or .pth or .bin"),
])
def test_suffix_that_does_not_fit_the_format_is_refused(tmp_path, tiny_dir, monkeypatch, capsys, name, flags,
                                                        message):
    no_conversion(monkeypatch)
    target = tmp_path / name
    assert converttosdxl.main(["--model_path", str(tiny_dir), "--checkpoint_path", str(target), *flags]) == 2
    assert capsys.readouterr().err.strip() == f"error: --checkpoint_path {target}: {message}"
    assert list(tmp_path.iterdir()) == []


def test_a_pickle_suffix_without_flags_writes_a_pickle(tmp_path, tiny_dir):
    target = tmp_path / "model.pt"  # before, anything but .ckpt became safetensors, which ComfyUI then misreads
    assert converttosdxl.main(["--model_path", str(tiny_dir), "--checkpoint_path", str(target)]) == 0
    state = torch.load(target, weights_only=True)["state_dict"]
    assert torch.equal(state["model.diffusion_model.input_blocks.0.0.weight"],
                       load_file(tiny_dir / "unet" / "diffusion_pytorch_model.safetensors")["conv_in.weight"])

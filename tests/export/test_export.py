"""converttosdxl.py / export/single_file.py: the original SDXL layout, round trips through diffusers, each pitfall."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from helpers import PROBE
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import converttosdxl
from sdxl_ff.export.single_file import bigg_to_original, clip_l_to_original, convert_folder
from sdxl_ff.model.weight_check import ExportError, weight_files

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
TE2 = "conditioner.embedders.1.model."


@pytest.fixture(scope="module")
def reference(tiny_dir):
    return StableDiffusionXLPipeline.from_pretrained(tiny_dir, local_files_only=True)


@pytest.fixture(scope="module")
def exported(tiny_dir, tmp_path_factory):
    """fp32 export through the CLI, with the argument names of diffusers' classic script; the shapes check reads
    them off the configs, so the converter imports torch alone of the heavy libraries (seconds per export)."""
    path = tmp_path_factory.mktemp("export") / "tiny.safetensors"
    proc = subprocess.run([sys.executable, "-c", PROBE, str(ROOT / "converttosdxl.py"), "--model_path", str(tiny_dir),
                           "--checkpoint_path", str(path), "--use_safetensors"],
                          capture_output=True, text=True, timeout=300)
    assert proc.stdout.endswith("exit 0 imported ['torch']\n"), proc.stdout + proc.stderr[-3000:]
    return path


def copy_folder(src, dst, **scheduler):
    shutil.copytree(src, dst)
    if scheduler:
        config_path = dst / "scheduler" / "scheduler_config.json"
        config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **scheduler}))
    return dst


def assert_same_weights(reference, loaded, cast=None):
    for name in COMPONENTS:
        ref, got = getattr(reference, name).state_dict(), getattr(loaded, name).state_dict()
        assert ref.keys() == got.keys(), name
        for key, value in ref.items():
            expected = value if cast is None else value.to(cast).to(value.dtype)
            assert torch.equal(got[key], expected), f"{name}.{key}"


def test_round_trip_fp32_is_bit_identical(exported, tiny_dir, reference):
    loaded = StableDiffusionXLPipeline.from_single_file(str(exported), config=str(tiny_dir), local_files_only=True)
    assert_same_weights(reference, loaded)


def test_round_trip_half_is_fp16_rounding(tmp_path, tiny_dir, reference):
    path = tmp_path / "half.safetensors"
    state = convert_folder(tiny_dir, path, half=True)
    assert {v.dtype for k, v in state.items() if v.is_floating_point()} == {torch.float16}
    loaded = StableDiffusionXLPipeline.from_single_file(str(path), config=str(tiny_dir), local_files_only=True,
                                                        torch_dtype=torch.float32)
    assert_same_weights(reference, loaded, cast=torch.float16)


def test_file_layout_metadata_and_mode(exported, tiny_dir):
    assert os.stat(exported).st_mode & 0o777 == 0o644
    with safe_open(str(exported), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    prefixes = ("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.transformer.text_model.",
                TE2)
    assert all(k.startswith(prefixes) for k in keys)
    assert not [k for k in keys if "_orig_mod" in k] and "v_pred" not in keys and "ztsnr" not in keys
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert meta["modelspec.prediction_type"] == "epsilon" and meta["sdxl_ff.dtype"] == "float32"
    assert meta["sdxl_ff.source"] == str(tiny_dir.resolve())
    assert not [p for p in exported.parent.iterdir() if p.name.startswith(".")]  # no temporary left


def test_ckpt_holds_the_same_tensors(exported, tiny_dir, tmp_path):
    # the converter's main() in this process: `exported` starts it as a user does
    assert converttosdxl.main(["--model_path", str(tiny_dir), "--checkpoint_path", str(tmp_path / "tiny.ckpt")]) == 0
    ckpt = torch.load(tmp_path / "tiny.ckpt", weights_only=True)["state_dict"]
    ref = load_file(exported)
    assert ckpt.keys() == ref.keys() and all(torch.equal(ckpt[k], ref[k]) for k in ref)


def test_text_projection_is_transposed_into_openclip_orientation(exported, reference):
    weight = reference.text_encoder_2.text_projection.weight  # Linear: y = x @ W.T
    stored = load_file(exported)[TE2 + "text_projection"]
    assert not torch.equal(weight, weight.T)  # not symmetric, so a missing transpose would fail below
    assert torch.equal(stored, weight.T)
    pooled = torch.randn(3, weight.shape[1])
    projected = reference.text_encoder_2.text_projection(pooled)
    assert torch.allclose(pooled @ stored, projected, atol=1e-6)  # OpenCLIP computes x @ P


def test_qkv_fused_into_in_proj(exported, reference):
    state, attn = load_file(exported), reference.text_encoder_2.text_model.encoder.layers[1].self_attn
    fused = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
    assert torch.equal(state[TE2 + "transformer.resblocks.1.attn.in_proj_weight"], fused)
    assert torch.equal(state[TE2 + "transformer.resblocks.1.attn.in_proj_bias"],
                       torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]))
    assert not [k for k in state if k.startswith(TE2) and (".q_proj." in k or ".k_proj." in k or ".v_proj." in k)]


def test_clip_l_gets_text_model_prefix_whichever_transformers_saved_it(reference):
    flat = reference.text_encoder.state_dict()  # transformers 5: no `text_model.` prefix
    assert not any(k.startswith("text_model.") for k in flat)
    old_style = {f"text_model.{k}": v for k, v in flat.items()}
    a, b = clip_l_to_original(flat), clip_l_to_original(old_style)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(k.startswith("conditioner.embedders.0.transformer.text_model.") for k in a)
    assert "conditioner.embedders.0.transformer.text_model.encoder.layers.1.mlp.fc2.bias" in a
    assert torch.equal(a["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"],
                       torch.arange(77).unsqueeze(0))


def test_vae_mid_attention_becomes_1x1_conv(exported, reference):
    state, attn = load_file(exported), reference.vae.decoder.mid_block.attentions[0]
    for ours, linear in (("q", attn.to_q), ("k", attn.to_k), ("v", attn.to_v), ("proj_out", attn.to_out[0])):
        conv = state[f"first_stage_model.decoder.mid.attn_1.{ours}.weight"]
        assert conv.shape == (*linear.weight.shape, 1, 1)
        assert torch.equal(conv[:, :, 0, 0], linear.weight)
    assert state["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4
    assert state["first_stage_model.decoder.mid.attn_1.norm.weight"].ndim == 1


def test_compiled_model_keys_lose_orig_mod(tiny_dir, tmp_path, exported):
    folder = copy_folder(tiny_dir, tmp_path / "compiled")
    file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    save_file({f"_orig_mod.{k}": v for k, v in load_file(file).items()}, file)
    state = convert_folder(folder, tmp_path / "out.safetensors")
    ref = load_file(exported)
    assert state.keys() == ref.keys() and all(torch.equal(state[k], ref[k]) for k in ref)


def test_reads_sharded_fp16_variant(tiny_dir, tmp_path, reference):
    folder = copy_folder(tiny_dir, tmp_path / "sharded")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    UNet2DConditionModel.from_pretrained(tiny_dir / "unet").to(torch.float16).save_pretrained(
        folder / "unet", variant="fp16", max_shard_size="2MB")
    assert len(weight_files(folder / "unet")) > 1
    state = convert_folder(folder, tmp_path / "out.safetensors")
    ref = reference.unet.conv_in.weight.half()
    assert torch.equal(state["model.diffusion_model.input_blocks.0.0.weight"], ref)


@pytest.mark.parametrize("scheduler, markers", [
    ({"prediction_type": "v_prediction"}, {"v_pred"}),
    ({"prediction_type": "v_prediction", "rescale_betas_zero_snr": True}, {"v_pred", "ztsnr"}),
])
def test_v_prediction_markers(tiny_dir, tmp_path, scheduler, markers):
    folder = copy_folder(tiny_dir, tmp_path / "vpred", **scheduler)
    convert_folder(folder, tmp_path / "v.safetensors", half=True)
    with safe_open(str(tmp_path / "v.safetensors"), framework="pt") as f:
        assert {"v_pred", "ztsnr"} & set(f.keys()) == markers
        assert f.metadata()["modelspec.prediction_type"] == "v"


# --------------------------------------------------------------------------- strictness and bad input

def test_leftover_key_is_an_error(reference):
    state = {**reference.text_encoder_2.state_dict(), "text_model.encoder.extra.weight": torch.zeros(1)}
    with pytest.raises(ExportError, match=r"text_encoder_2: 1 weights have no place.*encoder\.extra\.weight"):
        bigg_to_original(state)


def test_missing_key_is_an_error(tiny_dir, tmp_path):
    folder = copy_folder(tiny_dir, tmp_path / "missing")
    file = folder / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(file)
    del state["decoder.mid_block.attentions.0.to_q.weight"]
    save_file(state, file)
    with pytest.raises(ExportError, match=r"do not match .*vae/config.json: missing decoder\.mid_block"):
        convert_folder(folder, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_folder_missing_a_component(tiny_dir, tmp_path):
    folder = copy_folder(tiny_dir, tmp_path / "novae")
    shutil.rmtree(folder / "vae")
    with pytest.raises(ExportError, match=r"not a Diffusers SDXL folder: missing vae/"):
        convert_folder(folder, tmp_path / "out.safetensors")


def test_sd15_folder_is_refused(tiny_dir, tmp_path, capsys):
    folder = copy_folder(tiny_dir, tmp_path / "sd15")
    shutil.rmtree(folder / "text_encoder_2")
    shutil.rmtree(folder / "tokenizer_2")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionPipeline"}))
    out = tmp_path / "out.safetensors"
    assert converttosdxl.main(["--model_path", str(folder), "--checkpoint_path", str(out)]) == 2
    assert "holds a StableDiffusionPipeline (Stable Diffusion 1.x/2.x layout), not SDXL" in capsys.readouterr().err
    assert not (tmp_path / "out.safetensors").exists()


def test_half_written_weights_are_an_error(tiny_dir, tmp_path):
    folder = copy_folder(tiny_dir, tmp_path / "truncated")
    file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(ExportError, match=r"unet/diffusion_pytorch_model.safetensors cannot be read .*incomplete"):
        convert_folder(folder, tmp_path / "out.safetensors")


def test_missing_shard_is_an_error(tiny_dir, tmp_path):
    folder = copy_folder(tiny_dir, tmp_path / "shards")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    UNet2DConditionModel.from_pretrained(tiny_dir / "unet").save_pretrained(folder / "unet", max_shard_size="2MB")
    shard = sorted((folder / "unet").glob("*-of-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ExportError, match=rf"lists shards that are missing: {shard.name}"):
        convert_folder(folder, tmp_path / "out.safetensors")

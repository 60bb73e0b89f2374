"""The exporter's layout at SDXL base 1.0's full size, built on the meta device (no weights, no memory).

tests/reference/sdxl_base_configs holds SDXL base 1.0's component configs; the parameter counts below
pin them to the real model. The key set is checked three ways: against the counts of the original
sd_xl_base_1.0.safetensors (2,515 tensors), against the keys loaders detect SDXL by, and by
diffusers' own original->Diffusers converter, which must map our output back onto every model key.
"""

import json

import pytest
import torch
from accelerate import init_empty_weights
from conftest import ROOT
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sdxl_ff.export.single_file import to_original
from sdxl_ff.model.weight_check import PREFIX

CONFIGS = ROOT / "tests" / "reference" / "sdxl_base_configs"
# Tensors per component in Stability's sd_xl_base_1.0.safetensors (2,515 in all).
ORIGINAL_COUNTS = {"unet": 1680, "vae": 248, "text_encoder": 197, "text_encoder_2": 390}
MILLION_PARAMS = {"unet": 2567.5, "vae": 83.7, "text_encoder": 123.1, "text_encoder_2": 694.7}
SDXL_SHAPES = {  # keys ComfyUI/diffusers/A1111 detect SDXL by, with the original shapes
    "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
    "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
    "model.diffusion_model.input_blocks.4.1.proj_in.weight": (640, 640),  # linear proj_in
    "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
    "model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.2.weight": (1280, 5120),
    "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.5.2.conv.weight": (640, 640, 3, 3),
    "model.diffusion_model.output_blocks.6.0.skip_connection.weight": (320, 960, 1, 1),
    "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
    "first_stage_model.decoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
    "first_stage_model.encoder.down.3.block.1.conv2.weight": (512, 512, 3, 3),
    "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
    "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
    "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": (77, 768),
    "conditioner.embedders.0.transformer.text_model.encoder.layers.11.self_attn.q_proj.weight": (768, 768),
    "conditioner.embedders.0.transformer.text_model.embeddings.position_ids": (1, 77),
    "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": (1280,),
    "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
    "conditioner.embedders.1.model.positional_embedding": (77, 1280),
    "conditioner.embedders.1.model.text_projection": (1280, 1280),
    "conditioner.embedders.1.model.ln_final.weight": (1280,),
    "conditioner.embedders.1.model.logit_scale": (),
}


@pytest.fixture(scope="module")
def full_size():
    with init_empty_weights():
        models = {
            "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(CONFIGS / "unet")),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(CONFIGS / "vae")),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(CONFIGS / "text_encoder")),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(CONFIGS / "text_encoder_2")),
        }
    configs = {name: json.loads((CONFIGS / name / "config.json").read_text()) for name in models}
    states = {name: model.state_dict() for name, model in models.items()}
    return models, states, to_original(states, configs)


def test_configs_are_sdxl_base_size(full_size):
    models, _, _ = full_size
    for name, model in models.items():
        assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(MILLION_PARAMS[name], abs=0.05)
    assert all(p.device.type == "meta" for p in models["unet"].parameters())


def test_key_counts_match_the_original_file(full_size):
    _, _, out = full_size
    assert {name: sum(k.startswith(prefix) for k in out) for name, prefix in PREFIX.items()} == ORIGINAL_COUNTS
    assert len(out) == 2515 and not [k for k in out if "_orig_mod" in k]


def test_detection_keys_and_shapes(full_size):
    _, _, out = full_size
    for key, shape in SDXL_SHAPES.items():
        assert key in out, key
        assert tuple(out[key].shape) == shape, key


def test_diffusers_maps_our_layout_back_onto_every_weight(full_size):
    models, states, out = full_size
    back = {
        "unet": convert_ldm_unet_checkpoint(out, dict(models["unet"].config)),
        "vae": convert_ldm_vae_checkpoint(out, dict(models["vae"].config)),
        "text_encoder": {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(out).items()
                         if not k.endswith("position_ids")},
        "text_encoder_2": convert_open_clip_checkpoint(models["text_encoder_2"], out,
                                                       prefix="conditioner.embedders.1.model."),
    }
    for name, state in states.items():
        assert back[name].keys() == state.keys(), name
        wrong = [k for k, v in state.items() if tuple(back[name][k].shape) != tuple(v.shape)]
        assert not wrong, (name, wrong[:5])


def test_text_projection_stays_square_and_meta(full_size):
    _, states, out = full_size
    assert states["text_encoder_2"]["text_projection.weight"].shape == (1280, 1280)
    assert out["conditioner.embedders.1.model.text_projection"].device == torch.device("meta")

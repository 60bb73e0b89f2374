"""architecture.py: the weight names and shapes read off a config equal those of the modules diffusers and
transformers build from it, for every feature it follows; anything else is left to the built modules."""

import inspect
import json

import pytest
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig

from sdxl_ff.model import architecture
from sdxl_ff.model.parts import build_tiny_sdxl
from sdxl_ff.model.weight_check import architecture_shapes, built_shapes

TINY = build_tiny_sdxl(0)
TINY_UNET = {k: v for k, v in TINY.unet.config.items() if not k.startswith("_")}
TINY_VAE = {k: v for k, v in TINY.vae.config.items() if not k.startswith("_")}
# the released SDXL base UNet's config.json (diffusers 0.19: no attention_type, dropout, reverse_... keys)
SDXL_UNET = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "center_input_sample": False, "class_embed_type": None, "class_embeddings_concat": False, "conv_in_kernel": 3,
    "conv_out_kernel": 3, "cross_attention_dim": 2048, "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
    "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None, "flip_sin_to_cos": True,
    "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 32,
    "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False, "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816, "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default", "sample_size": 128, "time_cond_proj_dim": None,
    "time_embedding_act_fn": None, "time_embedding_dim": None, "time_embedding_type": "positional",
    "timestep_post_act": None, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
    "use_linear_projection": True, "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.19.0.dev0"}


def write(folder, config):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def assert_derived_equals_built(component, folder):
    derived = architecture.derived_shapes(component, folder)
    assert derived is not None, "this config should be read off, not built"
    built = built_shapes(component, folder)
    assert sorted(derived.keys() ^ built.keys()) == [] and derived == built


@pytest.mark.parametrize("change", [
    {},  # the tiny SDXL as built
    {"use_linear_projection": False, "addition_embed_type": None},  # SD 1.x: 1x1 convolutions, no extra embedding
    {"layers_per_block": [1, 2, 3], "transformer_layers_per_block": [1, 3, 2], "cross_attention_dim": [96, 48, 80]},
    {"attention_head_dim": 3},  # 64 channels in 3 heads: inner width 63, not 64
    {"time_embedding_dim": 40, "conv_in_kernel": 1, "conv_out_kernel": 5, "in_channels": 9, "out_channels": 8},
    {"down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
     "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"], "block_out_channels": [32, 48, 64]},
])
def test_unet_shapes_equal_the_built_unet(tmp_path, change):
    assert_derived_equals_built("unet", write(tmp_path / "unet", {**TINY_UNET, **change}))


def test_released_sdxl_unet_config_is_read_off_exactly(tmp_path):
    folder = write(tmp_path / "unet", SDXL_UNET)
    shapes = architecture.derived_shapes("unet", folder)
    assert sum(_count(s) for s in shapes.values()) == 2_567_463_684  # SDXL base's UNet parameters
    assert_derived_equals_built("unet", folder)


def _count(shape):
    n = 1
    for d in shape:
        n *= d
    return n


@pytest.mark.parametrize("change", [
    {}, {"mid_block_add_attention": False, "use_quant_conv": False, "use_post_quant_conv": False},
    {"latent_channels": 16, "layers_per_block": 2, "in_channels": 4, "out_channels": 1},
    {"block_out_channels": [8, 16], "down_block_types": ["DownEncoderBlock2D"] * 2,
     "up_block_types": ["UpDecoderBlock2D"] * 2},
])
def test_vae_shapes_equal_the_built_vae(tmp_path, change):
    assert_derived_equals_built("vae", write(tmp_path / "vae", {**TINY_VAE, **change}))


@pytest.mark.parametrize("component", ["text_encoder", "text_encoder_2"])
@pytest.mark.parametrize("change", [{}, {"num_hidden_layers": 3, "intermediate_size": 40, "projection_dim": 24},
                                    {"vocab_size": None, "max_position_embeddings": None}])  # None: the defaults
def test_clip_shapes_equal_the_built_text_encoders(tmp_path, component, change):
    config = getattr(TINY, component).config.to_dict()
    config.update({k: v for k, v in change.items() if v is not None})
    for key in [k for k, v in change.items() if v is None]:
        del config[key]
    assert_derived_equals_built(component, write(tmp_path / component, config))


@pytest.mark.parametrize(("component", "change"), [
    ("unet", {"class_embed_type": "timestep"}), ("unet", {"attention_type": "gated"}),
    ("unet", {"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "AttnDownBlock2D"]}),
    ("unet", {"transformer_layers_per_block": [[1], [1, 1], [2, 2]]}), ("unet", {"a_newer_diffusers_key": 1}),
    ("unet", {"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"}), ("unet", {"time_cond_proj_dim": 8}),
    ("vae", {"down_block_types": ["DownEncoderBlock2D"] * 3 + ["AttnDownEncoderBlock2D"]}),
    ("text_encoder", {"model_type": "clip"}),
])
def test_what_it_does_not_follow_is_built(tmp_path, component, change):
    base = {"unet": TINY_UNET, "vae": TINY_VAE, "text_encoder": TINY.text_encoder.config.to_dict()}[component]
    folder = write(tmp_path / component, {**base, **change})
    assert architecture.derived_shapes(component, folder) is None
    if component == "unet" and "a_newer_diffusers_key" in change:  # diffusers ignores it: the built answer is ours
        assert architecture_shapes(component, folder) == built_shapes(component, folder)


def test_defaults_are_the_libraries_own():
    """A config.json from an older library omits keys: their defaults must be what diffusers/transformers use."""
    for cls, defaults in ((UNet2DConditionModel, architecture.UNET_DEFAULTS),
                          (AutoencoderKL, architecture.VAE_DEFAULTS)):
        signature = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self"}
        assert signature == defaults, cls.__name__  # a new parameter (another diffusers) must be reviewed here
    clip = {k: p.default for k, p in inspect.signature(CLIPTextConfig.__init__).parameters.items()}
    assert {k: clip[k] for k in architecture.CLIP_DEFAULTS} == architecture.CLIP_DEFAULTS

"""The weight names and shapes a component's config.json calls for, read off the config: no torch, no model library.

Building the modules on the meta device (weight_check.py) gives the same answer but first imports diffusers and
transformers (~4 CPU-seconds: diffusers' packages import every model they hold); the converter pays that for every
single file it writes. This covers the blocks of SDXL and SD 1.x/2.x UNets, the KL autoencoder and CLIP's text
models; for any other config `derived_shapes` returns None and the modules are built. tests/model/test_architecture.py
holds it equal to the built modules for each supported feature, and the defaults below to the libraries' own.
"""

from __future__ import annotations

import json
from pathlib import Path

Shapes = dict[str, tuple[int, ...]]

# UNet2DConditionModel.__init__'s defaults (a config.json written by an older diffusers omits newer keys)
UNET_DEFAULTS = {
    "sample_size": None, "in_channels": 4, "out_channels": 4, "center_input_sample": False, "flip_sin_to_cos": True,
    "freq_shift": 0, "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                          "DownBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "only_cross_attention": False, "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2,
    "downsample_padding": 1, "mid_block_scale_factor": 1, "dropout": 0.0, "act_fn": "silu", "norm_num_groups": 32,
    "norm_eps": 1e-05, "cross_attention_dim": 1280, "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "attention_head_dim": 8, "num_attention_heads": None, "dual_cross_attention": False,
    "use_linear_projection": False, "class_embed_type": None, "addition_embed_type": None,
    "addition_time_embed_dim": None, "num_class_embeds": None, "upcast_attention": False,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None, "attention_type": "default", "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None, "cross_attention_norm": None, "addition_embed_type_num_heads": 64,
}
# the values of the UNet keys that add or reshape weights, as far as this module follows them
UNET_FIXED = {"mid_block_type": "UNetMidBlock2DCrossAttn", "num_attention_heads": None, "only_cross_attention": False,
              "reverse_transformer_layers_per_block": None, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
              "dual_cross_attention": False, "class_embed_type": None, "num_class_embeds": None,
              "resnet_time_scale_shift": "default", "time_embedding_type": "positional", "time_cond_proj_dim": None,
              "attention_type": "default", "class_embeddings_concat": False, "cross_attention_norm": None}
VAE_DEFAULTS = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ("DownEncoderBlock2D",),
    "up_block_types": ("UpDecoderBlock2D",), "block_out_channels": (64,), "layers_per_block": 1, "act_fn": "silu",
    "latent_channels": 4, "norm_num_groups": 32, "sample_size": 32, "scaling_factor": 0.18215, "shift_factor": None,
    "latents_mean": None, "latents_std": None, "force_upcast": True, "use_quant_conv": True,
    "use_post_quant_conv": True, "mid_block_add_attention": True,
}
# CLIPTextConfig's keys that shape weights; the rest (dropout, activation, token ids, ...) shape none
CLIP_DEFAULTS = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "projection_dim": 512,
                 "num_hidden_layers": 12, "max_position_embeddings": 77}


def derived_shapes(component: str, folder: Path) -> Shapes | None:
    """Every weight name and shape `folder`/config.json calls for, or None where this module does not follow it."""
    config = json.loads((folder / "config.json").read_text())
    if component == "unet":
        return unet_shapes(config)
    if component == "vae":
        return autoencoder_kl_shapes(config)
    return clip_text_shapes(config, projection=component == "text_encoder_2")


def _known(config: dict, defaults: dict) -> dict | None:
    """The config over the class's defaults; None when it names a key the class does not have (another version)."""
    if any(key not in defaults for key in config if not key.startswith("_")):
        return None
    return {**defaults, **{k: v for k, v in config.items() if not k.startswith("_")}}


def _linear(s: Shapes, name: str, out: int, inp: int, bias: bool = True) -> None:
    s[f"{name}.weight"] = (out, inp)
    if bias:
        s[f"{name}.bias"] = (out,)


def _conv(s: Shapes, name: str, out: int, inp: int, kernel: int) -> None:
    s[f"{name}.weight"], s[f"{name}.bias"] = (out, inp, kernel, kernel), (out,)


def _norm(s: Shapes, name: str, channels: int) -> None:
    s[f"{name}.weight"], s[f"{name}.bias"] = (channels,), (channels,)


def _resnet(s: Shapes, name: str, inp: int, out: int, temb: int | None) -> None:
    """diffusers' ResnetBlock2D (time_emb_proj only with a time embedding; a 1x1 shortcut where channels change)."""
    _norm(s, f"{name}.norm1", inp)
    _conv(s, f"{name}.conv1", out, inp, 3)
    if temb:
        _linear(s, f"{name}.time_emb_proj", out, temb)
    _norm(s, f"{name}.norm2", out)
    _conv(s, f"{name}.conv2", out, out, 3)
    if inp != out:
        _conv(s, f"{name}.conv_shortcut", out, inp, 1)


def _transformer(s: Shapes, name: str, channels: int, heads: int, cross: int, layers: int, linear: bool) -> None:
    """diffusers' Transformer2DModel of BasicTransformerBlocks (self-, cross-attention, GEGLU feed-forward)."""
    inner = heads * (channels // heads)
    _norm(s, f"{name}.norm", channels)
    project = (lambda n, o, i: _linear(s, n, o, i)) if linear else (lambda n, o, i: _conv(s, n, o, i, 1))
    project(f"{name}.proj_in", inner, channels)
    for b in range(layers):
        block = f"{name}.transformer_blocks.{b}"
        for attn, context in (("attn1", inner), ("attn2", cross)):
            _linear(s, f"{block}.{attn}.to_q", inner, inner, bias=False)
            _linear(s, f"{block}.{attn}.to_k", inner, context, bias=False)
            _linear(s, f"{block}.{attn}.to_v", inner, context, bias=False)
            _linear(s, f"{block}.{attn}.to_out.0", inner, inner)
        for norm in ("norm1", "norm2", "norm3"):
            _norm(s, f"{block}.{norm}", inner)
        _linear(s, f"{block}.ff.net.0.proj", inner * 8, inner)
        _linear(s, f"{block}.ff.net.2", inner, inner * 4)
    project(f"{name}.proj_out", channels, inner)


def unet_shapes(config: dict) -> Shapes | None:
    """UNet2DConditionModel of (CrossAttn)Down/UpBlock2D, the cross-attention mid block, text_time or no extra
    embedding; None for anything else."""
    c = _known(config, UNET_DEFAULTS)
    if c is None or any(c[key] != value for key, value in UNET_FIXED.items()) or not c["norm_num_groups"] \
            or c["addition_embed_type"] not in (None, "text_time") or c["cross_attention_dim"] is None:
        return None
    channels, down, up = list(c["block_out_channels"]), list(c["down_block_types"]), list(c["up_block_types"])
    n = len(down)
    per_block = {key: list(c[key]) if isinstance(c[key], (list, tuple)) else [c[key]] * n
                 for key in ("layers_per_block", "attention_head_dim", "cross_attention_dim",
                             "transformer_layers_per_block")}
    if len(channels) != n or len(up) != n or any(len(v) != n for v in per_block.values()) \
            or set(down) - {"DownBlock2D", "CrossAttnDownBlock2D"} or set(up) - {"UpBlock2D", "CrossAttnUpBlock2D"} \
            or not all(isinstance(t, int) for t in per_block["transformer_layers_per_block"]):
        return None
    layers, heads = per_block["layers_per_block"], per_block["attention_head_dim"]
    cross, depth, linear = per_block["cross_attention_dim"], per_block["transformer_layers_per_block"], \
        c["use_linear_projection"]
    temb = c["time_embedding_dim"] or channels[0] * 4
    s: Shapes = {}
    _conv(s, "conv_in", channels[0], c["in_channels"], c["conv_in_kernel"])
    _linear(s, "time_embedding.linear_1", temb, channels[0])
    _linear(s, "time_embedding.linear_2", temb, temb)
    if c["addition_embed_type"] == "text_time":
        if c["projection_class_embeddings_input_dim"] is None:
            return None
        _linear(s, "add_embedding.linear_1", temb, c["projection_class_embeddings_input_dim"])
        _linear(s, "add_embedding.linear_2", temb, temb)
    out = channels[0]
    for i, kind in enumerate(down):
        inp, out = out, channels[i]
        for j in range(layers[i]):
            _resnet(s, f"down_blocks.{i}.resnets.{j}", inp if j == 0 else out, out, temb)
            if kind == "CrossAttnDownBlock2D":
                _transformer(s, f"down_blocks.{i}.attentions.{j}", out, heads[i], cross[i], depth[i], linear)
        if i < n - 1:
            _conv(s, f"down_blocks.{i}.downsamplers.0.conv", out, out, 3)
    for j in range(2):
        _resnet(s, f"mid_block.resnets.{j}", channels[-1], channels[-1], temb)
    _transformer(s, "mid_block.attentions.0", channels[-1], heads[-1], cross[-1], depth[-1], linear)
    reverse = channels[::-1]
    out = reverse[0]
    for i, kind in enumerate(up):
        previous, out, skip = out, reverse[i], reverse[min(i + 1, n - 1)]
        count = layers[::-1][i] + 1
        for j in range(count):
            skip_channels = skip if j == count - 1 else out
            _resnet(s, f"up_blocks.{i}.resnets.{j}", (previous if j == 0 else out) + skip_channels, out, temb)
            if kind == "CrossAttnUpBlock2D":
                _transformer(s, f"up_blocks.{i}.attentions.{j}", out, heads[::-1][i], cross[::-1][i],
                             depth[::-1][i], linear)
        if i < n - 1:
            _conv(s, f"up_blocks.{i}.upsamplers.0.conv", out, out, 3)
    _norm(s, "conv_norm_out", channels[0])
    _conv(s, "conv_out", c["out_channels"], channels[0], c["conv_out_kernel"])
    return s


def _vae_mid(s: Shapes, name: str, channels: int, attention: bool) -> None:
    """UNetMidBlock2D without a time embedding: resnet, one single-head attention (biased projections), resnet."""
    _resnet(s, f"{name}.resnets.0", channels, channels, None)
    if attention:
        _norm(s, f"{name}.attentions.0.group_norm", channels)
        for proj in ("to_q", "to_k", "to_v", "to_out.0"):
            _linear(s, f"{name}.attentions.0.{proj}", channels, channels)
    _resnet(s, f"{name}.resnets.1", channels, channels, None)


def autoencoder_kl_shapes(config: dict) -> Shapes | None:
    """AutoencoderKL of DownEncoderBlock2D / UpDecoderBlock2D; None for anything else."""
    c = _known(config, VAE_DEFAULTS)
    if c is None:
        return None
    channels, down, up = list(c["block_out_channels"]), list(c["down_block_types"]), list(c["up_block_types"])
    n, latent, layers = len(channels), c["latent_channels"], c["layers_per_block"]
    if len(down) != n or len(up) != n or set(down) != {"DownEncoderBlock2D"} or set(up) != {"UpDecoderBlock2D"}:
        return None
    s: Shapes = {}
    _conv(s, "encoder.conv_in", channels[0], c["in_channels"], 3)
    out = channels[0]
    for i in range(n):
        inp, out = out, channels[i]
        for j in range(layers):
            _resnet(s, f"encoder.down_blocks.{i}.resnets.{j}", inp if j == 0 else out, out, None)
        if i < n - 1:
            _conv(s, f"encoder.down_blocks.{i}.downsamplers.0.conv", out, out, 3)
    _vae_mid(s, "encoder.mid_block", channels[-1], c["mid_block_add_attention"])
    _norm(s, "encoder.conv_norm_out", channels[-1])
    _conv(s, "encoder.conv_out", 2 * latent, channels[-1], 3)
    _conv(s, "decoder.conv_in", channels[-1], latent, 3)
    _vae_mid(s, "decoder.mid_block", channels[-1], c["mid_block_add_attention"])
    reverse = channels[::-1]
    out = reverse[0]
    for i in range(n):
        previous, out = out, reverse[i]
        for j in range(layers + 1):
            _resnet(s, f"decoder.up_blocks.{i}.resnets.{j}", previous if j == 0 else out, out, None)
        if i < n - 1:
            _conv(s, f"decoder.up_blocks.{i}.upsamplers.0.conv", out, out, 3)
    _norm(s, "decoder.conv_norm_out", channels[0])
    _conv(s, "decoder.conv_out", c["out_channels"], channels[0], 3)
    if c["use_quant_conv"]:
        _conv(s, "quant_conv", 2 * latent, 2 * latent, 1)
    if c["use_post_quant_conv"]:
        _conv(s, "post_quant_conv", latent, latent, 1)
    return s


def clip_text_shapes(config: dict, projection: bool) -> Shapes | None:
    """CLIPTextModel (or ...WithProjection) without the `text_model.` prefix; None unless a `clip_text_model`."""
    if config.get("model_type") != "clip_text_model":
        return None
    c = {key: config.get(key, default) for key, default in CLIP_DEFAULTS.items()}
    hidden, inner = c["hidden_size"], c["intermediate_size"]
    s: Shapes = {"embeddings.token_embedding.weight": (c["vocab_size"], hidden),
                 "embeddings.position_embedding.weight": (c["max_position_embeddings"], hidden)}
    for i in range(c["num_hidden_layers"]):
        layer = f"encoder.layers.{i}"
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            _linear(s, f"{layer}.self_attn.{proj}", hidden, hidden)
        _norm(s, f"{layer}.layer_norm1", hidden)
        _linear(s, f"{layer}.mlp.fc1", inner, hidden)
        _linear(s, f"{layer}.mlp.fc2", hidden, inner)
        _norm(s, f"{layer}.layer_norm2", hidden)
    _norm(s, "final_layer_norm", hidden)
    if projection:
        _linear(s, "text_projection", c["projection_dim"], hidden, bias=False)
    return s

"""Diffusers SDXL folder -> one checkpoint in the original Stability layout (ComfyUI, A1111, Forge).

The key mapping is data: one table of regex rules per component, applied strictly. Every input
tensor is placed exactly once; a key no rule knows, a key the architecture needs but the input
lacks, or a wrong shape is an error, never a warning (ComfyUI only logs missing keys, so a broken
export would "load" and draw garbage). Works on meta tensors too, which is how the full-size
layout is tested without memory.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sdxl_ff.model.weight_check import PREFIX, ExportError, mismatch_message, shape_problems, weight_files
from sdxl_ff.runtime.files import remove_dead_writers_leftovers, write_atomic

log = logging.getLogger(__name__)

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
CLIP_L_POSITIONS = 77
OPENCLIP_LOGIT_SCALE = math.log(100.0)  # the value trained OpenCLIP models carry; unused for generation


Rule = tuple[str, Callable[..., str | None]]


def _apply_rules(state: dict, rules: list[Rule], component: str) -> dict[str, str]:
    """Map every input key to its output name with the first matching rule; unknown keys are an error."""
    compiled = [(re.compile(pattern), target) for pattern, target in rules]
    names, leftovers = {}, []
    for key in state:
        for pattern, target in compiled:
            match = pattern.fullmatch(key)
            if match and (name := target(*match.groups())) is not None:
                names[key] = name
                break
        else:
            leftovers.append(key)
    if leftovers:
        raise ExportError(f"{component}: {len(leftovers)} weights have no place in the SDXL layout, e.g. "
                          f"{', '.join(sorted(leftovers)[:5])}; is this an SDXL {component}?")
    placed = [name for name in names.values() if ".in_proj_" not in name]  # q/k/v are fused on purpose
    if len(set(placed)) != len(placed):
        raise ExportError(f"{component}: two weights map to the same name; the input is not a standard "
                          f"Diffusers SDXL {component}")
    return names


# --------------------------------------------------------------------------- UNet

UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
UNET_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
            "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
            "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _resnet(block: str, part: str, rest: str) -> str | None:
    return f"{block}.{UNET_RESNET[part]}.{rest}" if part in UNET_RESNET else None


def unet_rules(config: dict) -> list[Rule]:
    """Diffusers UNet2DConditionModel -> `input_blocks` / `middle_block` / `output_blocks` numbering."""
    per = config["layers_per_block"]
    if not isinstance(per, int):
        raise ExportError(f"unet/config.json: layers_per_block {per!r} differs per block; SDXL uses one number")
    up_attention = ["CrossAttn" in t for t in config["up_block_types"]]
    top = "|".join(re.escape(k) for k in UNET_TOP)
    return [
        (rf"({top})\.(.+)", lambda name, rest: f"{UNET_TOP[name]}.{rest}"),
        (r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.+)",
         lambda i, j, part, rest: _resnet(f"input_blocks.{(per + 1) * int(i) + int(j) + 1}.0", part, rest)),
        (r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)",
         lambda i, j, rest: f"input_blocks.{(per + 1) * int(i) + int(j) + 1}.1.{rest}"),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)",
         lambda i, rest: f"input_blocks.{(per + 1) * (int(i) + 1)}.0.op.{rest}"),
        (r"mid_block\.resnets\.([01])\.(\w+)\.(.+)",
         lambda j, part, rest: _resnet(f"middle_block.{2 * int(j)}", part, rest)),
        (r"mid_block\.attentions\.0\.(.+)", lambda rest: f"middle_block.1.{rest}"),
        (r"up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.+)",
         lambda i, j, part, rest: _resnet(f"output_blocks.{(per + 1) * int(i) + int(j)}.0", part, rest)),
        (r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)",
         lambda i, j, rest: f"output_blocks.{(per + 1) * int(i) + int(j)}.1.{rest}"),
        (r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)",  # after the attention when the level has one
         lambda i, rest: f"output_blocks.{(per + 1) * int(i) + per}.{2 if up_attention[int(i)] else 1}.conv.{rest}"),
    ]


# --------------------------------------------------------------------------- VAE

VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
              "conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _vae_resnet(block: str, part: str, rest: str) -> str | None:
    return f"{block}.{VAE_RESNET[part]}.{rest}" if part in VAE_RESNET else None


def vae_rules(config: dict) -> list[Rule]:
    """Diffusers AutoencoderKL -> `encoder.down.N.block.M`; decoder levels are numbered in reverse."""
    last = len(config["block_out_channels"]) - 1
    attention = "|".join(re.escape(k) for k in VAE_ATTENTION)
    return [
        (r"(quant_conv|post_quant_conv)\.(.+)", lambda name, rest: f"{name}.{rest}"),
        (r"(encoder|decoder)\.(conv_in|conv_out)\.(.+)", lambda side, name, rest: f"{side}.{name}.{rest}"),
        (r"(encoder|decoder)\.conv_norm_out\.(.+)", lambda side, rest: f"{side}.norm_out.{rest}"),
        (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.+)",
         lambda i, j, part, rest: _vae_resnet(f"encoder.down.{i}.block.{j}", part, rest)),
        (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)",
         lambda i, rest: f"encoder.down.{i}.downsample.conv.{rest}"),
        (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.+)",
         lambda i, j, part, rest: _vae_resnet(f"decoder.up.{last - int(i)}.block.{j}", part, rest)),
        (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)",
         lambda i, rest: f"decoder.up.{last - int(i)}.upsample.conv.{rest}"),
        (r"(encoder|decoder)\.mid_block\.resnets\.([01])\.(\w+)\.(.+)",
         lambda side, j, part, rest: _vae_resnet(f"{side}.mid.block_{int(j) + 1}", part, rest)),
        (rf"(encoder|decoder)\.mid_block\.attentions\.0\.({attention})\.(weight|bias)",
         lambda side, part, rest: f"{side}.mid.attn_1.{VAE_ATTENTION[part]}.{rest}"),
    ]


def vae_attention_as_conv(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """The original VAE's mid-block attention uses 1x1 convolutions: Linear [C, C] -> [C, C, 1, 1]."""
    if ".mid.attn_1." in name and name.endswith("weight") and ".norm." not in name and tensor.ndim == 2:
        return tensor.reshape(*tensor.shape, 1, 1)
    return tensor


# --------------------------------------------------------------------------- text encoders

def _without_text_model(state: dict) -> dict:
    """transformers 5 saves CLIPTextModel without `text_model.`; older versions (and bigG) with it."""
    return {key.removeprefix("text_model."): value for key, value in state.items()}


CLIP_L_RULES: list[Rule] = [(r"((?:embeddings|encoder|final_layer_norm)\..+)", lambda rest: rest)]

OPENCLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                  "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_layer = "|".join(re.escape(k) for k in OPENCLIP_LAYER)
OPENCLIP_RULES: list[Rule] = [
    (r"embeddings\.token_embedding\.weight", lambda: "token_embedding.weight"),
    (r"embeddings\.position_embedding\.weight", lambda: "positional_embedding"),
    (r"final_layer_norm\.(weight|bias)", lambda rest: f"ln_final.{rest}"),
    (r"text_projection\.weight", lambda: "text_projection"),
    (rf"encoder\.layers\.(\d+)\.({_layer})\.(weight|bias)",
     lambda n, part, rest: f"transformer.resblocks.{n}.{OPENCLIP_LAYER[part]}.{rest}"),
    (r"encoder\.layers\.(\d+)\.self_attn\.[qkv]_proj\.(weight|bias)",  # fused below
     lambda n, rest: f"transformer.resblocks.{n}.attn.in_proj_{rest}"),
]


def clip_l_to_original(state: dict) -> dict:
    """CLIP-L keeps Hugging Face names under `conditioner.embedders.0.transformer.text_model.`."""
    state = _without_text_model(state)
    position_ids = state.pop("embeddings.position_ids", None)
    names = _apply_rules(state, CLIP_L_RULES, "text_encoder")
    out = {PREFIX["text_encoder"] + names[k]: v for k, v in state.items()}
    if position_ids is None:  # the original file carries them; transformers 5 no longer saves them
        position_ids = torch.arange(CLIP_L_POSITIONS, device=_device(state)).unsqueeze(0)
    out[PREFIX["text_encoder"] + "embeddings.position_ids"] = position_ids
    return out


def bigg_to_original(state: dict) -> dict:
    """OpenCLIP naming: q/k/v fused into `in_proj`, `text_projection` transposed (x @ P, not Linear)."""
    state = _without_text_model(state)
    state.pop("embeddings.position_ids", None)  # a derived buffer: OpenCLIP has none
    names = _apply_rules(state, OPENCLIP_RULES, "text_encoder_2")
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        name = PREFIX["text_encoder_2"] + names[key]
        if ".in_proj_" in name:
            fused.setdefault(name, {})[key.split(".self_attn.")[1][0]] = value
        elif name.endswith("text_projection"):
            out[name] = value.T.contiguous()
        else:
            out[name] = value
    for name, parts in fused.items():
        if sorted(parts) != ["k", "q", "v"]:
            raise ExportError(f"text_encoder_2: {name} needs q, k and v projections, found only {sorted(parts)}")
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    scale_like = out[PREFIX["text_encoder_2"] + "ln_final.weight"]
    out[PREFIX["text_encoder_2"] + "logit_scale"] = torch.full((), OPENCLIP_LOGIT_SCALE, dtype=scale_like.dtype,
                                                               device=scale_like.device)
    return out


def _device(state: dict) -> torch.device:
    return next(iter(state.values())).device


# --------------------------------------------------------------------------- whole model

def _renamed(state: dict, rules: list[Rule], component: str) -> dict:
    names = _apply_rules(state, rules, component)
    return {PREFIX[component] + names[key]: value for key, value in state.items()}


def to_original(states: dict[str, dict], configs: dict[str, dict]) -> dict[str, torch.Tensor]:
    """All four Diffusers state dicts -> one original-layout state dict; each tensor placed once."""
    parts = {
        "unet": _renamed(states["unet"], unet_rules(configs["unet"]), "unet"),
        "vae": {name: vae_attention_as_conv(name, value)
                for name, value in _renamed(states["vae"], vae_rules(configs["vae"]), "vae").items()},
        "text_encoder": clip_l_to_original(states["text_encoder"]),
        "text_encoder_2": bigg_to_original(states["text_encoder_2"]),
    }
    out: dict[str, torch.Tensor] = {}
    for part in parts.values():
        out.update(part)
    return out


def prediction_markers(scheduler_config: dict) -> dict[str, torch.Tensor]:
    """ComfyUI's markers: `v_pred` selects v-prediction, `ztsnr` (read with v_pred) zero-terminal SNR."""
    markers = {}
    if scheduler_config.get("prediction_type") == "v_prediction":
        markers["v_pred"] = torch.tensor([])
    if scheduler_config.get("rescale_betas_zero_snr"):
        if "v_pred" not in markers:
            log.warning("zero-terminal SNR without v-prediction: ComfyUI reads `ztsnr` only with `v_pred`")
        markers["ztsnr"] = torch.tensor([])
    return markers


def strip_compile_prefix(state: dict) -> dict:
    """torch.compile wraps modules as `_orig_mod`; those names must never reach the checkpoint."""
    return {key.replace("_orig_mod.", ""): value for key, value in state.items()}


# --------------------------------------------------------------------------- reading the folder


def check_sdxl_folder(model_path: Path) -> None:
    """Refuse folders that are not a Diffusers SDXL pipeline, saying what is wrong."""
    if not model_path.is_dir():
        raise ExportError(f"{model_path}: no such folder; give the Diffusers folder the trainer wrote")
    index = model_path / "model_index.json"
    pipeline = json.loads(index.read_text()).get("_class_name", "") if index.is_file() else ""
    if pipeline and "XL" not in pipeline:
        raise ExportError(f"{model_path} holds a {pipeline} (Stable Diffusion 1.x/2.x layout), not SDXL; "
                          f"this converter writes SDXL checkpoints only")
    missing = [c for c in (*COMPONENTS, "scheduler") if not (model_path / c).is_dir()]
    if missing:
        hint = " (an SD 1.x/2.x folder has one text encoder)" if missing == ["text_encoder_2"] else ""
        raise ExportError(f"{model_path} is not a Diffusers SDXL folder: missing {', '.join(missing)}/{hint}")


def read_weights(folder: Path, variant: str | None = None) -> dict[str, torch.Tensor]:
    """Read a component's tensors from one file or all its shards; a damaged file is a clear error."""
    state: dict[str, torch.Tensor] = {}
    for file in weight_files(folder, variant):
        try:
            part = load_file(file) if file.suffix == ".safetensors" else \
                torch.load(file, map_location="cpu", weights_only=True)
        except (SafetensorError, OSError, RuntimeError, EOFError) as e:
            raise ExportError(f"{file} cannot be read ({type(e).__name__}: {e}); it is incomplete or damaged "
                              f"(a half-written save?): save the model again") from e
        state.update(part)
    return strip_compile_prefix(state)


def check_complete(component: str, folder: Path, state: dict) -> None:
    """The weights must be exactly what the config describes: nothing missing, nothing extra, right shapes."""
    problems = shape_problems(component, folder, {key: tuple(value.shape) for key, value in state.items()})
    if problems:
        raise ExportError(mismatch_message(folder, problems))


def read_folder(model_path: Path, variant: str | None = None) -> tuple[dict, dict]:
    """(state dicts, configs) of the four components plus the scheduler config, all checked."""
    check_sdxl_folder(model_path)
    states, configs = {}, {}
    for component in COMPONENTS:
        folder = model_path / component
        configs[component] = json.loads((folder / "config.json").read_text())
        states[component] = read_weights(folder, variant)
        check_complete(component, folder, states[component])
    unet = configs["unet"]
    if unet.get("addition_embed_type") != "text_time" or len(unet["down_block_types"]) != 3:
        raise ExportError(f"{model_path / 'unet'} is not an SDXL UNet (needs addition_embed_type 'text_time' "
                          f"and three down blocks)")
    configs["scheduler"] = json.loads((model_path / "scheduler" / "scheduler_config.json").read_text())
    return states, configs


# --------------------------------------------------------------------------- writing

def describe(model_path: Path, configs: dict, dtype: torch.dtype) -> dict[str, str]:
    """Safetensors metadata: the modelspec keys other tools show, plus where the weights came from."""
    v_pred = configs["scheduler"].get("prediction_type") == "v_prediction"
    meta = {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "stable-diffusion-xl-v1-base",
            "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
            "modelspec.title": model_path.resolve().name, "modelspec.resolution": "1024x1024",
            "modelspec.prediction_type": "v" if v_pred else "epsilon",
            "sdxl_ff.source": str(model_path.resolve()), "sdxl_ff.dtype": str(dtype).removeprefix("torch."),
            "sdxl_ff.zero_terminal_snr": str(bool(configs["scheduler"].get("rescale_betas_zero_snr"))).lower()}
    run_config = model_path / "sdxl_ff_config.json"
    if run_config.is_file():
        meta["sdxl_ff.training_config"] = run_config.read_text()
    return meta


def fp16_overflow(state: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(tensors, values) among the finite floating-point values that fp16 cannot hold (they would become inf)."""
    limit = torch.finfo(torch.float16).max
    counts = [int((v.isfinite() & (v.abs() > limit)).sum()) for v in state.values() if v.is_floating_point()]
    return sum(c > 0 for c in counts), sum(counts)


def to_half(state: dict[str, torch.Tensor], allow_overflow: bool) -> dict[str, torch.Tensor]:
    """fp16 copies of the floating-point tensors; values beyond fp16's range refuse, or warn when allowed."""
    tensors, values = fp16_overflow(state)
    if values:
        what = (f"{values} value(s) in {tensors} tensor(s) exceed fp16's range (±65504) and would become inf "
                f"with --half")
        if not allow_overflow:
            raise ExportError(f"{what}; export without --half (fp32), or pass --allow-overflow to accept the infs")
        log.warning("%s; written as inf (--allow-overflow)", what)
    return {k: v.half() if v.is_floating_point() else v for k, v in state.items()}


def convert_folder(model_path: str | Path, checkpoint_path: str | Path, *, half: bool = False,
                   use_safetensors: bool = True, variant: str | None = None,
                   allow_overflow: bool = False) -> dict[str, torch.Tensor]:
    """Convert a Diffusers SDXL folder and write the single file atomically (mode 0644); return the tensors."""
    model_path, checkpoint_path = Path(model_path), Path(checkpoint_path)
    states, configs = read_folder(model_path, variant)
    state = to_original(states, configs)
    if half:
        state = to_half(state, allow_overflow)
    state.update(prediction_markers(configs["scheduler"]))
    dtype = torch.float16 if half else states["unet"]["conv_in.weight"].dtype
    # shared=True: the temporary name carries its writer, so what a killed conversion left is told from a live one's
    remove_dead_writers_leftovers(checkpoint_path.parent, of=checkpoint_path.name)
    if use_safetensors:
        metadata = {"format": "pt", **describe(model_path, configs, dtype)}
        write_atomic(checkpoint_path, lambda tmp: save_file(state, tmp, metadata=metadata), shared=True)
    else:
        write_atomic(checkpoint_path, lambda tmp: torch.save({"state_dict": state}, tmp), shared=True)
    log.info("wrote %s: %d tensors, %s", checkpoint_path, len(state), dtype)
    return state

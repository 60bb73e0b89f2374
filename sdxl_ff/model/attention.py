"""Attention backend: flash-attn when installed and usable, else PyTorch SDPA (diffusers' default).

diffusers' UNet2DConditionModel calls F.scaled_dot_product_attention from its AttnProcessor2_0;
the processor below does the same projections and calls flash-attn's kernel instead for the
fp16/bf16 CUDA tensors it supports, falling back to SDPA for anything else (masks, fp32, CPU).
The choice is made on q/k/v after the projections: under autocast the hidden states arrive in fp32
(layer norms compute in fp32) while the projections hand the kernel bf16/fp16.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


class FlashAttnProcessor:
    """AttnProcessor2_0's computation for SDXL's transformer blocks, with flash-attn's kernel."""

    def __init__(self, flash_fn: Callable | None = None):
        if flash_fn is None:
            from flash_attn import flash_attn_func as flash_fn
        self.flash_fn = flash_fn

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        unsupported = (attention_mask is not None or hidden_states.ndim != 3 or attn.spatial_norm is not None
                       or attn.group_norm is not None)
        residual = hidden_states
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attn.norm_cross and encoder_hidden_states is not None:
            context = attn.norm_encoder_hidden_states(context)
        batch = hidden_states.shape[0]
        heads = attn.heads
        q = attn.to_q(hidden_states).view(batch, -1, heads, attn.to_q.out_features // heads)
        k = attn.to_k(context).view(batch, -1, heads, attn.to_k.out_features // heads)
        v = attn.to_v(context).view(batch, -1, heads, attn.to_v.out_features // heads)
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        if unsupported or not flash_dtypes(q, k, v):
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 attn_mask=attention_mask, scale=attn.scale).transpose(1, 2)
        else:
            out = self.flash_fn(q, k, v, softmax_scale=attn.scale)
        out = out.reshape(batch, -1, heads * out.shape[-1]).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def flash_dtypes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """flash-attn's kernel takes q, k, v of one half-precision dtype (what autocast's projections return)."""
    return q.dtype == k.dtype == v.dtype and q.dtype in (torch.float16, torch.bfloat16)


FLASH_ATTN_MIN_CAPABILITY = (8, 0)  # flash-attn 2 runs on Ampere (sm_80) and newer only


def flash_attn_choice(version: str | None, import_error: str | None, device_type: str,
                      capability: tuple[int, int] | None) -> tuple[bool, str]:
    """Whether flash-attn can run, and why, from what was found: its `version` (None: not installed), the
    error importing it raised (if any), the device type and the CUDA compute capability (None off CUDA)."""
    if version is None:
        return False, "flash-attn not installed"
    if import_error is not None:
        return False, f"flash-attn failed to import ({import_error})"
    if device_type != "cuda":
        return False, "flash-attn needs a CUDA device"
    if capability is None or tuple(capability) < FLASH_ATTN_MIN_CAPABILITY:
        arch = "a GPU of unknown compute capability" if capability is None else f"sm_{capability[0]}{capability[1]}"
        return False, f"flash-attn needs an Ampere or newer GPU; this is {arch}"
    return True, f"flash-attn {version}"


def attention_log_line(usable: bool, reason: str) -> str:
    """The start-up log line naming the attention backend."""
    return f"attention: {reason} (SDPA for fp32/masked calls)" if usable else f"attention: PyTorch SDPA ({reason})"


def flash_attn_status(device: torch.device) -> tuple[bool, str]:
    """Whether flash-attn can be used on `device`, and why (for the start-up log line)."""
    version, import_error, capability = None, None, None
    if importlib.util.find_spec("flash_attn") is not None:
        version = "?"
        if device.type == "cuda":  # elsewhere it could not run anyway: no need to import it
            capability = torch.cuda.get_device_capability(device)
            try:
                import flash_attn
                version = getattr(flash_attn, "__version__", "?")
            except Exception as e:  # a wheel built for another torch/CUDA fails here
                import_error = f"{type(e).__name__}: {e}"
    return flash_attn_choice(version, import_error, device.type, capability)


def configure_attention(unet: torch.nn.Module, device: torch.device) -> str:
    """Install the best available attention on `unet`; return a description for the log."""
    usable, reason = flash_attn_status(device)
    if usable:
        unet.set_attn_processor(FlashAttnProcessor())
    return attention_log_line(usable, reason)

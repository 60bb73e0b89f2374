"""The flash-attn processor computes what diffusers' SDPA processor computes (same projections and layout)."""

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0

from sdxl_ff.attention import FlashAttnProcessor, configure_attention
from sdxl_ff.models import build_tiny_sdxl


def reference_flash(q, k, v, softmax_scale):
    """flash_attn_func's contract ([B, S, H, D] in and out), computed with SDPA in fp32."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2).float(), k.transpose(1, 2).float(),
                                         v.transpose(1, 2).float(), scale=softmax_scale)
    return out.transpose(1, 2).to(q.dtype)


def test_processor_matches_sdpa_on_tiny_unet():
    unet = build_tiny_sdxl(0).unet.to(torch.bfloat16)
    torch.manual_seed(0)
    x = torch.randn(2, 4, 16, 16, dtype=torch.bfloat16)
    ctx = torch.randn(2, 77, 96, dtype=torch.bfloat16)
    added = {"text_embeds": torch.randn(2, 32, dtype=torch.bfloat16),
             "time_ids": torch.tensor([[128, 128, 0, 0, 128, 128]] * 2, dtype=torch.bfloat16)}
    t = torch.tensor([10, 500])
    unet.set_attn_processor(AttnProcessor2_0())
    ref = unet(x, t, ctx, added_cond_kwargs=added).sample
    calls = []

    def counting(q, k, v, softmax_scale):
        calls.append(q.shape)
        return reference_flash(q, k, v, softmax_scale)

    unet.set_attn_processor(FlashAttnProcessor(counting))
    out = unet(x, t, ctx, added_cond_kwargs=added).sample
    assert calls, "the flash kernel was never called"
    assert torch.allclose(out.float(), ref.float(), atol=3e-2, rtol=3e-2)


def test_cpu_falls_back_to_sdpa():
    unet = build_tiny_sdxl(0).unet
    line = configure_attention(unet, torch.device("cpu"))
    assert line.startswith("attention: PyTorch SDPA")
    assert all(type(p).__name__ == "AttnProcessor2_0" for p in unet.attn_processors.values())

"""The flash-attn processor computes what diffusers' SDPA processor computes, and is chosen under autocast."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from sdxl_ff.model.attention import (
    FlashAttnProcessor,
    attention_log_line,
    configure_attention,
    flash_attn_choice,
    flash_attn_status,
)
from sdxl_ff.model.parts import build_tiny_sdxl


def reference_flash(q, k, v, softmax_scale):
    """flash_attn_func's contract ([B, S, H, D] in and out), computed with SDPA in fp32."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2).float(), k.transpose(1, 2).float(),
                                         v.transpose(1, 2).float(), scale=softmax_scale)
    return out.transpose(1, 2).to(q.dtype)


class CountingFlash:
    """A stand-in for flash_attn_func that computes real attention and records the dtypes it was given."""

    def __init__(self):
        self.dtypes = []

    def __call__(self, q, k, v, softmax_scale):
        self.dtypes.append((q.dtype, k.dtype, v.dtype))
        return reference_flash(q, k, v, softmax_scale)


def unet_inputs(dtype: torch.dtype) -> tuple:
    torch.manual_seed(0)
    added = {"text_embeds": torch.randn(2, 32, dtype=dtype),
             "time_ids": torch.tensor([[128, 128, 0, 0, 128, 128]] * 2, dtype=dtype)}
    return torch.randn(2, 4, 16, 16, dtype=dtype), torch.tensor([10, 500]), torch.randn(2, 77, 96, dtype=dtype), added


def run_unet(unet, processor, dtype: torch.dtype, autocast: bool = False) -> torch.Tensor:
    x, t, ctx, added = unet_inputs(dtype)
    unet.set_attn_processor(processor)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        return unet(x, t, ctx, added_cond_kwargs=added).sample.float()


def attention_layers(unet) -> int:
    return len(unet.attn_processors)


def test_processor_matches_sdpa_on_bf16_unet():
    unet = build_tiny_sdxl(0).unet.to(torch.bfloat16)
    ref = run_unet(unet, AttnProcessor2_0(), torch.bfloat16)
    flash = CountingFlash()
    out = run_unet(unet, FlashAttnProcessor(flash), torch.bfloat16)
    assert len(flash.dtypes) == attention_layers(unet)  # every self- and cross-attention took the kernel
    assert torch.allclose(out, ref, atol=3e-2, rtol=3e-2)


def cuda_autocast_layer_norms(unet) -> list[torch.dtype]:
    """Make CPU autocast behave like CUDA autocast, whose policy runs layer_norm in fp32 (on CPU it keeps bf16);
    returns the list that collects the hidden-states dtypes each attention layer receives."""
    received = []
    for module in unet.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.register_forward_hook(lambda _m, _args, out: out.float())
        if isinstance(module, Attention):
            module.register_forward_pre_hook(lambda _m, args, kwargs: received.append(
                (args[0] if args else kwargs["hidden_states"]).dtype), with_kwargs=True)
    return received


def test_autocast_training_path_takes_the_flash_kernel():
    """fp32 weights under bf16 autocast (how training runs): layer norms hand fp32 hidden states to the
    processor, the projections hand bf16 q/k/v to the kernel, so the kernel must be chosen."""
    unet = build_tiny_sdxl(0).unet
    received = cuda_autocast_layer_norms(unet)
    ref = run_unet(unet, AttnProcessor2_0(), torch.float32, autocast=True)
    flash = CountingFlash()
    out = run_unet(unet, FlashAttnProcessor(flash), torch.float32, autocast=True)
    assert set(received) == {torch.float32}  # the case that used to fall back to SDPA
    assert len(flash.dtypes) == attention_layers(unet)
    assert set(flash.dtypes) == {(torch.bfloat16,) * 3}
    assert torch.allclose(out, ref, atol=3e-2, rtol=3e-2)
    fp32 = run_unet(unet, AttnProcessor2_0(), torch.float32)
    assert (out - fp32).abs().max() < 0.1  # bf16 rounding only, not another computation


def test_cpu_autocast_takes_the_flash_kernel_too():
    unet = build_tiny_sdxl(0).unet  # CPU autocast keeps layer norms in bf16: the hidden states arrive in bf16
    flash = CountingFlash()
    run_unet(unet, FlashAttnProcessor(flash), torch.float32, autocast=True)
    assert set(flash.dtypes) == {(torch.bfloat16,) * 3} and len(flash.dtypes) == attention_layers(unet)


def test_autocast_backward_through_the_flash_kernel_matches_sdpa():
    unet = build_tiny_sdxl(0).unet
    cuda_autocast_layer_norms(unet)
    grads, flash = {}, CountingFlash()
    for name, processor in (("sdpa", AttnProcessor2_0()), ("flash", FlashAttnProcessor(flash))):
        unet.zero_grad(set_to_none=True)
        unet.set_attn_processor(processor)
        x, t, ctx, added = unet_inputs(torch.float32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = unet(x, t, ctx, added_cond_kwargs=added).sample.float().square().mean()
        loss.backward()
        grads[name] = unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.weight.grad.clone()
    assert len(flash.dtypes) == attention_layers(unet)
    scale = grads["sdpa"].abs().max()
    assert scale > 0 and (grads["flash"] - grads["sdpa"]).abs().max() < 0.05 * scale


def test_fp32_without_autocast_falls_back_to_sdpa():
    unet = build_tiny_sdxl(0).unet
    flash = CountingFlash()
    out = run_unet(unet, FlashAttnProcessor(flash), torch.float32)
    assert flash.dtypes == []  # flash-attn has no fp32 kernel
    assert torch.equal(out, run_unet(unet, AttnProcessor2_0(), torch.float32))


def test_cpu_falls_back_to_sdpa():
    unet = build_tiny_sdxl(0).unet
    line = configure_attention(unet, torch.device("cpu"))
    assert line.startswith("attention: PyTorch SDPA")
    assert all(type(p).__name__ == "AttnProcessor2_0" for p in unet.attn_processors.values())


PRE_AMPERE = "attention: PyTorch SDPA (flash-attn needs an Ampere or newer GPU"


@pytest.mark.parametrize("found, expected", [
    ((None, None, "cuda", (9, 0)), "attention: PyTorch SDPA (flash-attn not installed)"),
    (("2.8.3", "ImportError: undefined symbol", "cuda", (8, 6)),
     "attention: PyTorch SDPA (flash-attn failed to import (ImportError: undefined symbol))"),
    (("?", None, "cpu", None), "attention: PyTorch SDPA (flash-attn needs a CUDA device)"),
    (("2.8.3", None, "cuda", (7, 0)), f"{PRE_AMPERE}; this is sm_70)"),
    (("2.8.3", None, "cuda", (7, 5)), f"{PRE_AMPERE}; this is sm_75)"),
    (("2.8.3", None, "cuda", None), f"{PRE_AMPERE}; this is a GPU of unknown compute capability)"),
    (("2.8.3", None, "cuda", (8, 0)), "attention: flash-attn 2.8.3 (SDPA for fp32/masked calls)"),
    (("2.8.3", None, "cuda", (8, 9)), "attention: flash-attn 2.8.3 (SDPA for fp32/masked calls)"),
    (("2.8.3", None, "cuda", (9, 0)), "attention: flash-attn 2.8.3 (SDPA for fp32/masked calls)"),
    (("2.8.3", None, "cuda", (12, 0)), "attention: flash-attn 2.8.3 (SDPA for fp32/masked calls)"),
])
def test_flash_attn_only_where_it_runs_and_the_log_says_why(found, expected):
    """V100 (sm_70), T4/RTX 20xx (sm_75): flash-attn 2 refuses them at the first forward, so SDPA is chosen."""
    usable, reason = flash_attn_choice(*found)
    assert usable == expected.startswith("attention: flash-attn")
    assert attention_log_line(usable, reason) == expected


def test_status_on_this_machine_matches_the_choice():
    """flash_attn_status feeds the real probe (installed? device type) into the same choice."""
    installed = importlib.util.find_spec("flash_attn") is not None
    assert flash_attn_status(torch.device("cpu")) == flash_attn_choice("?" if installed else None, None, "cpu", None)

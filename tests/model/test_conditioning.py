"""Prompt encoding and time ids equal what diffusers' own SDXL pipeline computes."""

import torch
from diffusers import StableDiffusionXLPipeline

from sdxl_ff.model.conditioning import encode_prompts, time_ids
from sdxl_ff.model.parts import build_tiny_sdxl


def make_pipe():
    p = build_tiny_sdxl(0)
    return p, StableDiffusionXLPipeline(vae=p.vae, text_encoder=p.text_encoder, text_encoder_2=p.text_encoder_2,
                                        tokenizer=p.tokenizer, tokenizer_2=p.tokenizer_2, unet=p.unet,
                                        scheduler=p.scheduler)


def test_prompt_embeds_match_diffusers_pipeline():
    parts, pipe = make_pipe()
    captions = ["a red circle on a blue background", "a green square, small"]
    embeds, pooled = encode_prompts(captions, (parts.tokenizer, parts.tokenizer_2),
                                    (parts.text_encoder, parts.text_encoder_2), "cpu")
    ref_embeds, _, ref_pooled, _ = pipe.encode_prompt(captions, device="cpu", do_classifier_free_guidance=False)
    assert embeds.shape == (2, 77, 32 + 64) and pooled.shape == (2, 32)
    assert torch.equal(embeds, ref_embeds)
    assert torch.equal(pooled, ref_pooled)


def test_time_ids_match_diffusers_layout():
    _, pipe = make_pipe()
    ours = time_ids(torch.tensor([[768, 1024]]), torch.tensor([[12, 40]]), torch.tensor([[512, 640]]))
    ref = pipe._get_add_time_ids((768, 1024), (12, 40), (512, 640), dtype=torch.float32,
                                 text_encoder_projection_dim=32)
    assert torch.equal(ours, ref)


class Wrapper(torch.nn.Module):
    """Forwards to its module, as DDP and torch.compile do: the wrapper is no CLIPTextModelWithProjection."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def test_wrapped_text_encoder_2_still_gives_the_pooled_embedding():
    parts = build_tiny_sdxl(0)
    tokenizers, captions = (parts.tokenizer, parts.tokenizer_2), ["a red circle"]
    plain = encode_prompts(captions, tokenizers, (parts.text_encoder, parts.text_encoder_2), "cpu")
    wrapped = encode_prompts(captions, tokenizers, (Wrapper(parts.text_encoder), Wrapper(parts.text_encoder_2)), "cpu")
    assert wrapped[1] is not None and torch.equal(wrapped[1], plain[1]) and torch.equal(wrapped[0], plain[0])

"""SDXL conditioning: prompts through both text encoders, and the micro-conditioning time ids."""

from __future__ import annotations

import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from sdxl_ff.runtime.tensors import from_host


def tokenize(tokenizer: CLIPTokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids padded/truncated to the tokenizer's 77 positions, as SDXL was trained."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def encode_prompts(captions: list[str], tokenizers: tuple[CLIPTokenizer, CLIPTokenizer],
                   text_encoders: tuple[CLIPTextModel, CLIPTextModelWithProjection],
                   device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (prompt_embeds [B, 77, D1+D2], pooled [B, P]) exactly as SDXL conditions its UNet.

    Both encoders contribute their penultimate hidden states (concatenated on the feature axis);
    the pooled vector is encoder 2's projected end-of-text embedding.
    """
    # by position, not by class: under DDP or torch.compile encoder 2 is a wrapper, not a CLIPTextModelWithProjection
    outs = [encoder(from_host(tokenize(tokenizer, captions), device), output_hidden_states=True)
            for tokenizer, encoder in zip(tokenizers, text_encoders, strict=True)]
    return torch.cat([out.hidden_states[-2] for out in outs], dim=-1), outs[1].text_embeds


def time_ids(original_size: torch.Tensor, crop_top_left: torch.Tensor,
             target_size: torch.Tensor) -> torch.Tensor:
    """SDXL's add_time_ids [B, 6]: (orig_h, orig_w, crop_top, crop_left, target_h, target_w)."""
    return torch.cat([original_size, crop_top_left, target_size], dim=1).to(torch.float32)

"""predict(): the training forward pass takes the device from its caller, not from `unet.device` every step."""

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from sdxl_ff.model.parts import SDXL_SCHEDULE, build_tiny_sdxl
from sdxl_ff.objective.predict import predict


def test_predict_with_a_device_never_reads_unet_device(monkeypatch):
    parts = build_tiny_sdxl(0)
    scheduler = DDPMScheduler.from_config(dict(SDXL_SCHEDULE))
    batch = {"latents": torch.randn(2, 4, 8, 8), "caption": ["a red circle", "a blue square"],
             "original_size": torch.tensor([[64, 64]] * 2), "crop_top_left": torch.zeros(2, 2, dtype=torch.long),
             "target_size": torch.tensor([[64, 64]] * 2)}
    tokenizers, encoders = (parts.tokenizer, parts.tokenizer_2), (parts.text_encoder, parts.text_encoder_2)
    expected = predict(parts.unet, parts.vae, tokenizers, encoders, scheduler, batch, torch.Generator().manual_seed(1))

    def walked(self):  # diffusers' ModelMixin.device walks every submodule: ~5 ms a step on SDXL
        raise AssertionError("predict() read unet.device")

    monkeypatch.setattr(UNet2DConditionModel, "device", property(walked))
    with pytest.raises(AssertionError, match="read unet.device"):
        predict(parts.unet, parts.vae, tokenizers, encoders, scheduler, batch, torch.Generator().manual_seed(1))
    out = predict(parts.unet, parts.vae, tokenizers, encoders, scheduler, batch, torch.Generator().manual_seed(1),
                  device=torch.device("cpu"))
    assert torch.equal(out.prediction, expected.prediction) and torch.equal(out.loss_per_sample,
                                                                            expected.loss_per_sample)

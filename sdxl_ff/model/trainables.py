"""Which modules train: freezing, placement, dtypes, gradient checkpointing, and the weights as loaded."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from accelerate import Accelerator, init_empty_weights
from accelerate.utils import extract_model_from_parallel
from transformers import PreTrainedModel

from sdxl_ff.config.schema import Config
from sdxl_ff.model.parts import SDXLParts


def frozen_dtype(accelerator: Accelerator) -> torch.dtype:
    """dtype for frozen modules: the autocast dtype, so they cost half the memory on the GPU."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, torch.float32)


@dataclass
class Trainables:
    """The modules that train, with a name each ('unet', 'text_encoder', 'text_encoder_2').

    `pristine` holds CPU copies of frozen modules' weights as loaded, for those cast to a lower
    precision for compute, so that saving writes them unchanged rather than rounded.
    """
    modules: dict[str, torch.nn.Module]
    pristine: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for m in self.modules.values() for p in m.parameters() if p.requires_grad]

    def for_saving(self, name: str, module: torch.nn.Module) -> torch.nn.Module:
        """`module` itself, or a CPU twin holding its weights as loaded when it was cast for compute."""
        if name not in self.pristine:
            return module
        with init_empty_weights():
            if isinstance(module, PreTrainedModel):
                twin = type(module)(module.config)
            else:  # a diffusers model
                twin = type(module).from_config(module.config)
        twin.load_state_dict(self.pristine[name], assign=True)
        return twin


def configure_modules(parts: SDXLParts, cfg: Config, accelerator: Accelerator) -> Trainables:
    """Freeze or unfreeze each part, place it, pick its dtype, enable gradient checkpointing."""
    device, half = accelerator.device, frozen_dtype(accelerator)
    train = {"unet": True, "text_encoder": cfg.model.train_text_encoder_1,
             "text_encoder_2": cfg.model.train_text_encoder_2}
    vae_dtype = torch.bfloat16 if half == torch.bfloat16 else torch.float32  # SDXL's VAE overflows in fp16
    pristine = {}
    for name, dtype in [(n, half) for n, t in train.items() if not t] + [("vae", vae_dtype)]:
        module = getattr(parts, name)
        if module.dtype != dtype:
            pristine[name] = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
    trainables = {}
    for name, trained in train.items():
        module = getattr(parts, name)
        module.requires_grad_(trained)
        module.train(trained)
        module.to(device, (torch.bfloat16 if cfg.model.full_bf16 else torch.float32) if trained else half)
        own_aligned_storage(module)
        if trained:
            trainables[name] = module
            if cfg.model.use_gradient_checkpointing:
                if name == "unet":
                    module.enable_gradient_checkpointing()
                else:  # transformers 5 renamed it; the old name warns (FutureWarning) on every run
                    getattr(module, "activation_checkpointing_enable", module.gradient_checkpointing_enable)()
    parts.vae.requires_grad_(False).eval()
    parts.vae.to(device, vae_dtype)
    own_aligned_storage(parts.vae)
    return Trainables(trainables, pristine)


CPU_ALIGNMENT = 64  # bytes; what torch's CPU allocator guarantees and AVX-512 kernels prefer


def own_aligned_storage(module: torch.nn.Module) -> None:
    """Give every weight that sits at an unaligned address its own (aligned) copy.

    Diffusers loads a safetensors file as views into one buffer at arbitrary byte offsets. CPU kernels
    (MKL, oneDNN) take other code paths on unaligned memory and round differently, so a run resumed from
    a checkpoint folder would not compute bit for bit like the run that wrote it. On a GPU `.to(device)`
    has already copied every tensor: nothing to do there.
    """
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.data_ptr() % CPU_ALIGNMENT:
            tensor.data = tensor.data.clone()


def plain_module(module: torch.nn.Module) -> torch.nn.Module:
    """The module inside any torch.compile / DDP wrappers, whose state_dict keys are the model's own."""
    return extract_model_from_parallel(module, keep_torch_compile=False)

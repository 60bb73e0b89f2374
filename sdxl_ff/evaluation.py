"""Sample images during training: the prompts file, the two sampling backends, `run_eval()`, the grid.

`run_eval()` renders each prompt with its own seed into `<out_dir>/<index>_seed<seed>.png` plus
`grid.png`, with every module in eval mode under `torch.inference_mode()`, and afterwards puts back
exactly what training had: train flags, requires_grad, gradient checkpointing, devices and all RNG
state, so a run with evals trains identically to one without. The VAE and text encoders that the caches
parked on the CPU come to the UNet's device for the eval only.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import sampling
from .conditioning import encode_prompts, time_ids
from .config import ConfigError, EvalConfig
from .models import SDXLParts, vae_precision
from .state import replace_dir_atomic, rng_state, set_rng_state

log = logging.getLogger(__name__)
SIZE_PATTERN = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*$")
PROMPT_KEYS = {"prompt", "negative_prompt", "seed", "height", "width", "resolution", "size"}


@dataclass(frozen=True)
class EvalPrompt:
    index: int
    prompt: str
    negative_prompt: str
    seed: int
    height: int
    width: int

    @property
    def file_name(self) -> str:
        return f"{self.index:03d}_seed{self.seed}.png"


# --------------------------------------------------------------------------- prompts file

def _entry(index: int, raw: object, height: int, width: int) -> EvalPrompt:
    """One prompts-file entry; raises ValueError naming the problem."""
    if not isinstance(raw, dict):
        raise ValueError(f"expected an object like {{\"prompt\": \"...\", \"seed\": 1}}, got {json.dumps(raw)}")
    unknown = sorted(set(raw) - PROMPT_KEYS)
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(PROMPT_KEYS))}")
    prompt = raw.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("\"prompt\" must be a non-empty string")
    negative = raw.get("negative_prompt", "")
    if not isinstance(negative, str):
        raise ValueError(f"\"negative_prompt\" must be a string, got {json.dumps(negative)}")
    seed = raw.get("seed", index)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise ValueError(f"\"seed\" must be an integer >= 0, got {json.dumps(seed)}")
    for key in ("resolution", "size"):
        if key in raw:
            match = SIZE_PATTERN.match(str(raw[key]))
            if not match:
                raise ValueError(f"\"{key}\" must look like \"1024x640\" (width x height), got {json.dumps(raw[key])}")
            width, height = int(match.group(1)), int(match.group(2))
    height, width = raw.get("height", height), raw.get("width", width)
    for key, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 64 or value % 8:
            raise ValueError(f"\"{key}\" must be an integer >= 64 divisible by 8, got {json.dumps(value)}")
    return EvalPrompt(index, prompt, negative, seed, height, width)


def load_prompts(path: str | Path, height: int, width: int) -> list[EvalPrompt]:
    """Read and check the prompts file; every problem names the entry index. Raises ConfigError."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8-sig"))  # editors on Windows may add a BOM
    except FileNotFoundError:
        raise ConfigError(f"eval.prompts_path: {path} not found; see data/eval_prompts.example.json") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"eval.prompts_path: {path} is not valid JSON (line {e.lineno}, column {e.colno}): "
                          f"{e.msg}") from None
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"eval.prompts_path: {path} must hold a non-empty JSON list of prompt objects")
    errors, prompts = [], []
    for index, item in enumerate(raw):
        try:
            prompts.append(_entry(index, item, height, width))
        except ValueError as e:
            errors.append(f"entry {index}: {e}")
    if errors:
        raise ConfigError(f"eval.prompts_path: {path}: " + "; ".join(errors))
    return prompts


# --------------------------------------------------------------------------- training state

@contextlib.contextmanager
def parked_on(modules: list[torch.nn.Module], device: torch.device) -> Iterator[None]:
    """`modules` on `device` inside; after, every parameter and buffer is again the tensor it was before.

    The caches park the VAE and the text encoders on the CPU; eval needs them beside the UNet. Their
    weights do not change inside, so the originals are kept and put back: exact, and no copy back.
    """
    registered = [(sub, name, t, t.data) for module in modules for sub in module.modules()
                  for name, t in (*sub.named_parameters(recurse=False), *sub.named_buffers(recurse=False))]
    for module in modules:
        module.to(device)
    try:
        yield
    finally:
        for sub, name, original, data in registered:
            original.data = data  # Module.to may have moved this Parameter's data (CPU <-> CUDA) ...
            setattr(sub, name, original)  # ... or registered a new Parameter/buffer in its place


@contextlib.contextmanager
def inference_state(modules: list[torch.nn.Module]) -> Iterator[None]:
    """Eval mode + inference_mode inside; train flags, requires_grad, checkpointing, devices, RNG restored after."""
    subs = [m for module in modules for m in module.modules()]
    training = [m.training for m in subs]
    checkpointing = [getattr(m, "gradient_checkpointing", None) for m in subs]
    params = [p for module in modules for p in module.parameters()]
    requires_grad = [p.requires_grad for p in params]
    devices = [p.device for p in params]
    rng = rng_state()
    try:
        for module in modules:
            module.eval()
        with torch.inference_mode():
            yield
    finally:
        set_rng_state(rng)
        for m, was_training, ckpt in zip(subs, training, checkpointing, strict=True):
            m.training = was_training
            if ckpt is not None:
                m.gradient_checkpointing = ckpt
        for p, flag, device in zip(params, requires_grad, devices, strict=True):
            p.requires_grad_(flag)
            if p.device != device:  # only if something moved it; .data keeps the Parameter object
                p.data = p.data.to(device)


# --------------------------------------------------------------------------- sampling

def initial_noise(prompt: EvalPrompt, device: torch.device) -> torch.Tensor:
    """Unit noise from the prompt's seed, drawn on the CPU so every device and backend starts alike."""
    generator = torch.Generator().manual_seed(prompt.seed)
    return torch.randn((1, 4, prompt.height // 8, prompt.width // 8), generator=generator).to(device)


class GuidedUNet(torch.nn.Module):
    """The SDXL UNet as k-diffusion's inner model: (x, t) -> classifier-free-guided ε or v."""

    def __init__(self, unet, prompt_embeds: torch.Tensor, pooled: torch.Tensor, add_time_ids: torch.Tensor,
                 cfg_scale: float):
        super().__init__()
        self.unet, self.cfg_scale = unet, cfg_scale
        self.prompt_embeds, self.pooled, self.add_time_ids = prompt_embeds, pooled, add_time_ids

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        dtype = self.unet.dtype
        out = self.unet(torch.cat([x, x]).to(dtype), torch.cat([t, t]), self.prompt_embeds.to(dtype),
                        added_cond_kwargs={"text_embeds": self.pooled.to(dtype),
                                           "time_ids": self.add_time_ids.to(dtype)}).sample.float()
        uncond, cond = out.chunk(2)
        return uncond + self.cfg_scale * (cond - uncond)


def _conditioning(parts: SDXLParts, prompt: EvalPrompt, device) -> tuple[torch.Tensor, ...]:
    """(embeds, pooled, time_ids), negative first, as ComfyUI conditions SDXL without crops."""
    embeds, pooled = encode_prompts([prompt.negative_prompt, prompt.prompt], (parts.tokenizer, parts.tokenizer_2),
                                    (parts.text_encoder, parts.text_encoder_2), device)
    size = torch.tensor([[prompt.height, prompt.width]] * 2)
    return embeds, pooled, time_ids(size, torch.zeros(2, 2, dtype=torch.long), size).to(device)


def sample_kdiffusion(parts: SDXLParts, cfg: EvalConfig, prompt: EvalPrompt) -> torch.Tensor:
    """Latents from k-diffusion's own sampler on ComfyUI's sigma sequence."""
    with warnings.catch_warnings():  # k_diffusion imports clip, which warns about pkg_resources: not our line
        warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
        import k_diffusion.sampling as kd
        from k_diffusion.external import DiscreteEpsDDPMDenoiser, DiscreteVDDPMDenoiser
    device = parts.unet.device
    table = sampling.sigmas_from_scheduler_config(parts.scheduler.config)
    inner = GuidedUNet(parts.unet, *_conditioning(parts, prompt, device), cfg.cfg_scale)
    wrapper = DiscreteVDDPMDenoiser if parts.scheduler.config.prediction_type == "v_prediction" \
        else DiscreteEpsDDPMDenoiser
    # k-diffusion rebuilds the sigma table from ᾱ = 1/(1+σ²); feeding ComfyUI's table keeps it ComfyUI's
    denoiser = wrapper(inner, (1.0 / (1.0 + table.double() ** 2)).to(device), quantize=True)
    sampler, scheduler = sampling.resolve_shortcut(cfg.sampler_name, cfg.scheduler)
    sigmas = sampling.sampling_sigmas(sampler, scheduler, table, cfg.num_inference_steps).to(device)
    x = initial_noise(prompt, device) * sampling.initial_noise_scale(float(sigmas[0]), float(table[-1]))
    function_name, kwargs = sampling.KDIFFUSION_SAMPLERS[sampler]
    if sampler in sampling.BROWNIAN_SAMPLERS:
        positive = sigmas[sigmas > 0]
        kwargs = {**kwargs, "noise_sampler": kd.BrownianTreeNoiseSampler(
            x, positive.min(), positive.max(), seed=prompt.seed)}
    elif sampler in sampling.STOCHASTIC_SAMPLERS:
        generator = torch.Generator().manual_seed(prompt.seed + 1)
        kwargs = {**kwargs, "noise_sampler": lambda sigma, sigma_next: torch.randn(
            x.shape, generator=generator).to(x)}
    with warnings.catch_warnings():  # torchsde warns about float32 rounding at the interval ends
        warnings.filterwarnings("ignore", message="Should have t")
        return getattr(kd, function_name)(denoiser, x, sigmas, disable=True, **kwargs)


def describe_names(cfg: EvalConfig) -> str:
    """"sampler X, scheduler Y" as run, saying when eval.scheduler was a shortcut."""
    sampler, schedule = sampling.resolve_shortcut(cfg.sampler_name, cfg.scheduler)
    shortcut = f" (shortcut eval.scheduler={cfg.scheduler})" if schedule != cfg.scheduler else ""
    return f"sampler {sampler}, scheduler {schedule}{shortcut}"


@functools.cache
def with_comfyui_sigmas(cls: type) -> type:
    """A subclass of `cls` whose set_timesteps takes `sigmas=` (descending, ending in 0) and walks exactly them.

    The parent builds its state for len(sigmas) - 1 steps; then the UNet gets the integer timestep nearest each
    sigma, as in ComfyUI (diffusers' own `sigmas=` in EulerDiscrete feeds fractional ones; LMS and
    DPMSolverMultistep have no `sigmas=` in diffusers 0.42.1).
    """
    def set_timesteps(self, num_inference_steps: int | None = None, device=None, sigmas: list[float] | None = None):
        if sigmas is None:
            return cls.set_timesteps(self, num_inference_steps, device=device)
        cls.set_timesteps(self, len(sigmas) - 1, device=device)  # resets the solver's history and step index
        self.sigmas = torch.tensor(sigmas, dtype=torch.float32)
        table = sampling.sigmas_from_scheduler_config(self.config)
        timesteps = sampling.sigma_to_timestep(self.sigmas[:-1], table)
        self.timesteps = timesteps.to(device=device, dtype=self.timesteps.dtype)
        self.num_inference_steps = len(self.timesteps)

    return type(cls.__name__, (cls,), {"set_timesteps": set_timesteps, "__module__": __name__})


def diffusers_scheduler(parts: SDXLParts, cfg: EvalConfig):
    """(scheduler, sigmas or None): the sampler's diffusers scheduler, with ComfyUI's sigmas where it takes them."""
    sampler, schedule = sampling.resolve_shortcut(cfg.sampler_name, cfg.scheduler)
    class_name, options, custom = sampling.diffusers_route(sampler, schedule)
    if class_name not in {c for c, _ in sampling.DIFFUSERS_SAMPLERS.values()}:
        log.info("eval: %s is its own sampler; eval.sampler_name %r is not used", class_name, sampler)
    cls = sampling.diffusers_scheduler_class(class_name)
    if not custom:
        return cls.from_config(parts.scheduler.config, **options), None
    scheduler = with_comfyui_sigmas(cls).from_config(parts.scheduler.config, **options)
    table = sampling.sigmas_from_scheduler_config(parts.scheduler.config)
    return scheduler, sampling.sampling_sigmas(sampler, schedule, table, cfg.num_inference_steps).tolist()


def sample_diffusers(parts: SDXLParts, cfg: EvalConfig, prompt: EvalPrompt) -> np.ndarray:
    """An image [H, W, 3] in [0, 1]: StableDiffusionXLPipeline with the mapped scheduler samples the latents."""
    from diffusers import StableDiffusionXLPipeline
    scheduler, sigmas = diffusers_scheduler(parts, cfg)
    pipe = StableDiffusionXLPipeline(vae=parts.vae, text_encoder=parts.text_encoder,
                                     text_encoder_2=parts.text_encoder_2, tokenizer=parts.tokenizer,
                                     tokenizer_2=parts.tokenizer_2, unet=parts.unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    steps = {"sigmas": sigmas} if sigmas is not None else {"num_inference_steps": cfg.num_inference_steps}
    latents = pipe(prompt.prompt, negative_prompt=prompt.negative_prompt, height=prompt.height, width=prompt.width,
                   guidance_scale=cfg.cfg_scale, latents=initial_noise(prompt, parts.unet.device).to(parts.unet.dtype),
                   generator=torch.Generator().manual_seed(prompt.seed + 1), output_type="latent", **steps).images
    return decode(parts.vae, latents)  # our decode: an fp32 VAE stays fp32 under fp16 autocast


@torch.no_grad()
def decode(vae, latents: torch.Tensor) -> np.ndarray:
    """Latents -> image [H, W, 3] in [0, 1]."""
    with vae_precision(vae):
        image = vae.decode((latents / vae.config.scaling_factor).to(vae.device, vae.dtype)).sample.float()
    return (image[0].permute(1, 2, 0) / 2 + 0.5).clamp(0, 1).cpu().numpy()


def to_pil(image: np.ndarray) -> Image.Image:
    if not np.isfinite(image).all():
        log.warning("eval: the sampler produced non-finite values (NaN/Inf); they are shown black")
    return Image.fromarray((np.nan_to_num(image) * 255).round().astype(np.uint8))


def make_grid(images: list[Image.Image]) -> Image.Image:
    """Images in a near-square grid; cells are as large as the largest image (sizes may differ per prompt)."""
    columns = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    cell_w, cell_h = max(i.width for i in images), max(i.height for i in images)
    grid = Image.new("RGB", (columns * cell_w, rows * cell_h))
    for n, image in enumerate(images):
        grid.paste(image, ((n % columns) * cell_w, (n // columns) * cell_h))
    return grid


@dataclass
class EvalResult:
    out_dir: Path
    paths: list[Path]
    grid: Image.Image


def run_eval(parts: SDXLParts, cfg: EvalConfig, prompts: list[EvalPrompt], out_dir: str | Path,
             weights: contextlib.AbstractContextManager | None = None,
             autocast: contextlib.AbstractContextManager | None = None) -> EvalResult:
    """Render `prompts` into `out_dir` (replaced atomically); `weights` may swap EMA weights in meanwhile.

    `parts` holds the unwrapped modules; the training state is restored exactly afterwards.
    """
    helpers = [parts.vae, parts.text_encoder, parts.text_encoder_2]  # the caches may have parked them on the CPU
    images = []
    # parked_on is outermost: its moves happen outside inference_mode, so no weight becomes an inference tensor
    with (parked_on(helpers, parts.unet.device), inference_state([parts.unet, *helpers]),
          weights or contextlib.nullcontext(), autocast or contextlib.nullcontext()):
        for prompt in prompts:
            if cfg.backend == "kdiffusion":
                image = decode(parts.vae, sample_kdiffusion(parts, cfg, prompt))
            else:
                image = sample_diffusers(parts, cfg, prompt)
            images.append(to_pil(image))
    out_dir = Path(out_dir)
    grid = make_grid(images)
    with replace_dir_atomic(out_dir) as tmp:
        for prompt, image in zip(prompts, images, strict=True):
            image.save(tmp / prompt.file_name)
        grid.save(tmp / "grid.png")
    return EvalResult(out_dir, [out_dir / p.file_name for p in prompts], grid)

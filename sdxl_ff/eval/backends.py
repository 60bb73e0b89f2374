"""The two eval backends, each made to give ComfyUI's image: k-diffusion's samplers and diffusers' pipeline.

Both start from the same CPU noise of the prompt's seed, walk ComfyUI's sigma sequence (sdxl_ff/eval/schedules.py)
with ComfyUI's integer timesteps, guide as ComfyUI does, and draw the per-step noise of the stochastic
samplers as ComfyUI's default noise samplers do (comfy/k_diffusion/sampling.py). Where diffusers cannot
(its SDE samplers draw their own noise), the sampler table in docs/evaluation-and-comfyui.md says so.
tests/eval/test_comfy_reference.py compares both with latents made by ComfyUI's own code.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from sdxl_ff.config import sampler_names
from sdxl_ff.config.errors import ConfigError
from sdxl_ff.config.schema import EvalConfig
from sdxl_ff.eval import schedules
from sdxl_ff.model.conditioning import encode_prompts, time_ids
from sdxl_ff.model.parts import SDXLParts, vae_precision

log = logging.getLogger(__name__)
# An empty negative prompt: the diffusers pipeline zeroes it (force_zeros_for_empty_prompt in the saved
# model_index.json); ComfyUI's empty CLIPTextEncode encodes "". Each backend defaults to its own convention.
EMPTY_NEGATIVE_DEFAULTS = {"diffusers": "zeros", "kdiffusion": "encoded"}
# Told (steps done, steps in all) after each sampling step, e.g. to move a progress bar; it changes nothing.
Progress = Callable[[int, int], None]


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


def initial_noise(prompt: EvalPrompt, device: torch.device) -> torch.Tensor:
    """Unit noise from the prompt's seed, drawn on the CPU so every device and backend starts alike."""
    generator = torch.Generator().manual_seed(prompt.seed)
    return torch.randn((1, 4, prompt.height // 8, prompt.width // 8), generator=generator).to(device)


class GuidedDenoiser(torch.nn.Module):
    """The SDXL UNet as k-diffusion's model: (x, sigma) -> the classifier-free-guided denoised sample.

    Not k-diffusion's DiscreteEpsDDPMDenoiser: this one rounds as ComfyUI does (the input divided by
    sqrt(σ² + 1), the timestep from float32 logs of the float64 table, guidance on the denoised samples),
    which keeps long or ill-conditioned schedules (linear_quadratic with lms, dpmpp_3m_sde) on ComfyUI's image.
    """

    def __init__(self, unet, conditioning: tuple[torch.Tensor, ...], cfg_scale: float, table: torch.Tensor,
                 v_prediction: bool):
        super().__init__()
        self.unet, self.cfg_scale, self.v_prediction = unet, cfg_scale, v_prediction
        self.prompt_embeds, self.pooled, self.add_time_ids = conditioning
        self.table = table

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        dtype = self.unet.dtype
        xc = schedules.model_input(x, sigma)
        t = schedules.sigma_to_timestep(sigma, self.table).float()
        out = self.unet(torch.cat([xc, xc]).to(dtype), torch.cat([t, t]), self.prompt_embeds.to(dtype),
                        added_cond_kwargs={"text_embeds": self.pooled.to(dtype),
                                           "time_ids": self.add_time_ids.to(dtype)}).sample.float()
        uncond, cond = (schedules.denoised(x, sigma, o, self.v_prediction) for o in out.chunk(2))
        return uncond + (cond - uncond) * self.cfg_scale


def empty_negative(cfg: EvalConfig) -> str:
    """How an empty negative prompt conditions: eval.empty_negative, else the backend's own convention."""
    return cfg.empty_negative or EMPTY_NEGATIVE_DEFAULTS[cfg.backend]


def zeroed_negative(cfg: EvalConfig, prompt: EvalPrompt) -> bool:
    """True when the negative conditioning is all zeros (an empty negative with eval.empty_negative "zeros")."""
    return not prompt.negative_prompt and empty_negative(cfg) == "zeros"


def _conditioning(parts: SDXLParts, cfg: EvalConfig, prompt: EvalPrompt, device) -> tuple[torch.Tensor, ...]:
    """(embeds, pooled, time_ids), negative first, as ComfyUI conditions SDXL without crops."""
    embeds, pooled = encode_prompts([prompt.negative_prompt, prompt.prompt], (parts.tokenizer, parts.tokenizer_2),
                                    (parts.text_encoder, parts.text_encoder_2), device)
    if zeroed_negative(cfg, prompt):  # what StableDiffusionXLPipeline does with force_zeros_for_empty_prompt
        embeds[0], pooled[0] = 0, 0
    size = torch.tensor([[prompt.height, prompt.width]] * 2)
    return embeds, pooled, time_ids(size, torch.zeros(2, 2, dtype=torch.long), size).to(device)


def comfy_noise_sampler(sampler: str, x: torch.Tensor, sigmas: torch.Tensor, seed: int):
    """ComfyUI's default noise sampler for `sampler` (comfy/k_diffusion/sampling.py), or None if it draws none.

    The Brownian-tree samplers get a tree seeded with the prompt's seed and built on the CPU (ComfyUI's
    cpu=True) whatever the device; the others draw randn on x's device from a generator seeded with the
    seed itself. k-diffusion's own default_noise_sampler takes no seed, hence this function.
    """
    import k_diffusion.sampling as kd
    if sampler in sampler_names.BROWNIAN_SAMPLERS:
        points = sigmas.cpu().float()
        positive = points[points > 0]
        tree = kd.BrownianTreeNoiseSampler(x.cpu(), positive.min(), positive.max(), seed=seed)

        def snap(sigma: torch.Tensor) -> torch.Tensor:
            # k-diffusion's dpmpp_sde asks at exp(log σ), a rounding away from the σ ComfyUI passes; a tree
            # queried just outside its interval gives other noise
            sigma = sigma.cpu().float()
            near = torch.isclose(points, sigma, rtol=1e-6, atol=0)
            return points[near][0] if near.any() else sigma

        return lambda sigma, sigma_next: tree(snap(sigma), snap(sigma_next)).to(x)
    if sampler not in sampler_names.STOCHASTIC_SAMPLERS:
        return None
    generator = torch.Generator(device=x.device).manual_seed(seed)
    return lambda sigma, sigma_next: torch.randn(x.size(), dtype=x.dtype, layout=x.layout, device=x.device,
                                                 generator=generator)


def run_lms(denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback=None) -> torch.Tensor:
    """k-diffusion's lms, whose last step (to sigma 0) returns the denoised sample, as ComfyUI's does."""
    import k_diffusion.sampling as kd
    if float(sigmas[-1]) != 0:
        return kd.sample_lms(denoiser, x, sigmas, callback=callback, disable=True)
    # every step but the last: the same coefficients
    x = kd.sample_lms(denoiser, x, sigmas[:-1], callback=callback, disable=True)
    x = denoiser(x, sigmas[-2] * x.new_ones([x.shape[0]]))
    if callback is not None:
        callback({"i": len(sigmas) - 2})
    return x


def sample_kdiffusion(parts: SDXLParts, cfg: EvalConfig, prompt: EvalPrompt,
                      progress: Progress | None = None) -> torch.Tensor:
    """Latents from k-diffusion's own sampler on ComfyUI's sigma sequence, noise drawn as ComfyUI draws it."""
    import k_diffusion.sampling as kd
    device = parts.unet.device
    table = schedules.sigmas_from_scheduler_config(parts.scheduler.config)
    v_prediction = parts.scheduler.config.prediction_type == "v_prediction"
    denoiser = GuidedDenoiser(parts.unet, _conditioning(parts, cfg, prompt, device), cfg.cfg_scale, table,
                              v_prediction)
    sampler, scheduler = sampler_names.resolve_shortcut(cfg.sampler_name, cfg.scheduler)
    sigmas = schedules.sampling_sigmas(sampler, scheduler, table, cfg.num_inference_steps).to(device)
    sigma_max = float(schedules.table_sigmas(table)[-1])
    x = initial_noise(prompt, device) * schedules.initial_noise_scale(float(sigmas[0]), sigma_max)
    steps = len(sigmas) - 1
    callback = None if progress is None else lambda info: progress(info["i"] + 1, steps)
    if sampler == "lms":
        return run_lms(denoiser, x, sigmas, callback)
    function_name, kwargs = sampler_names.KDIFFUSION_SAMPLERS[sampler]
    noise_sampler = comfy_noise_sampler(sampler, x, sigmas, prompt.seed)
    if noise_sampler is not None:
        kwargs = {**kwargs, "noise_sampler": noise_sampler}
    with warnings.catch_warnings():  # torchsde warns about float32 rounding at the interval ends
        warnings.filterwarnings("ignore", message="Should have t")
        return getattr(kd, function_name)(denoiser, x, sigmas, callback=callback, disable=True, **kwargs)


@functools.cache
def comfyui_scheduler_class(cls: type) -> type:
    """A subclass of diffusers scheduler `cls` that does what ComfyUI does where the two differ.

    - set_timesteps takes `sigmas=` (descending, ending in 0) and walks exactly them: the parent builds its state
      for len(sigmas) - 1 steps, then the UNet gets the integer timestep nearest each sigma, as in ComfyUI
      (diffusers' own `sigmas=` in EulerDiscrete feeds fractional ones; LMS and DPMSolverMultistep have none);
    - the start noise is ComfyUI's: sqrt(1 + σ₀²) from σ₀ = sigma_max, else σ₀ (e.g. ddim_uniform), where diffusers
      uses sigma_max for "linspace"/"trailing" spacing; in VP space (DPMSolverMultistep, UniPC), divided by
      sqrt(1 + σ₀²), which diffusers takes as 1;
    - LMS ends on the denoised sample when the next sigma is 0, like ComfyUI's sample_lms;
    - DPMSolverMultistep's third-order SDE step gets the sign of one term that diffusers flips (see below).
    """
    def set_timesteps(self, *args, sigmas: list[float] | None = None, **kwargs):
        if sigmas is None:  # the parent's own signature (Heun's __init__ passes a third positional argument)
            return cls.set_timesteps(self, *args, **kwargs)
        device = kwargs.get("device", args[1] if len(args) > 1 else None)
        cls.set_timesteps(self, len(sigmas) - 1, device=device)  # resets the solver's history and step index
        self.sigmas = torch.tensor(sigmas, dtype=torch.float32)
        table = schedules.sigmas_from_scheduler_config(self.config)
        timesteps = schedules.sigma_to_timestep(self.sigmas[:-1], table)
        self.timesteps = timesteps.to(device=device, dtype=self.timesteps.dtype)
        self.num_inference_steps = len(self.timesteps)

    def init_noise_sigma(self):
        table = schedules.table_sigmas(schedules.sigmas_from_scheduler_config(self.config))
        first = float(self.sigmas[0])
        scale = schedules.initial_noise_scale(first, float(table[-1]))  # ComfyUI's, in its VE space
        return scale / (1.0 + first ** 2) ** 0.5 if cls.__name__ in sampler_names.VP_SPACE_CLASSES else scale

    def lms_step(self, model_output, timestep, sample, *args, return_dict: bool = True, **kwargs):
        out = cls.step(self, model_output, timestep, sample, *args, return_dict=True, **kwargs)
        if float(self.sigmas[self.step_index]) == 0:
            out.prev_sample = out.pred_original_sample
        return out if return_dict else (out.prev_sample, out.pred_original_sample)

    def third_order_update(self, model_output_list, *args, sample=None, noise=None, **kwargs):
        x = cls.multistep_dpm_solver_third_order_update(self, model_output_list, *args, sample=sample, noise=noise,
                                                        **kwargs)
        if self.config.algorithm_type != "sde-dpmsolver++":
            return x
        # diffusers 0.42.1 writes the D2 coefficient as α_t((1 - e^{-2h} - 2h)/(2h)² - 1/2); DPM-Solver++(3M) SDE
        # (and ComfyUI) has -α_t((e^{-2h} - 1 + 2h)/(2h)² - 1/2): the same but for the -1/2, so add α_t·D2 back
        sigmas = [self._sigma_to_alpha_sigma_t(self.sigmas[self.step_index + k]) for k in (1, 0, -1, -2)]
        lambdas = [torch.log(alpha) - torch.log(sigma) for alpha, sigma in sigmas]
        h, r0, r1 = lambdas[0] - lambdas[1], (lambdas[1] - lambdas[2]), (lambdas[2] - lambdas[3])
        r0, r1 = r0 / h, r1 / h
        m0, m1, m2 = model_output_list[-1], model_output_list[-2], model_output_list[-3]
        d2 = ((m0 - m1) / r0 - (m1 - m2) / r1) / (r0 + r1)
        return x + sigmas[0][0] * d2

    def keep(self, value):  # the VP classes' __init__ assigns their init_noise_sigma of 1
        pass

    members = {"set_timesteps": set_timesteps, "init_noise_sigma": property(init_noise_sigma, keep),
               "__module__": __name__}
    if cls.__name__ == "DPMSolverMultistepScheduler":
        members["multistep_dpm_solver_third_order_update"] = third_order_update
    if cls.__name__ == "LMSDiscreteScheduler":
        members["step"] = lms_step
    return type(cls.__name__, (cls,), members)


def check_diffusers_backend(cfg: EvalConfig, scheduler_config) -> None:
    """Raise ConfigError when the diffusers backend cannot walk ComfyUI's schedule for this model."""
    errors = sampler_names.model_schedule_errors(cfg.backend, cfg.sampler_name, cfg.scheduler,
                                            bool(scheduler_config.get("rescale_betas_zero_snr")))
    if errors:
        raise ConfigError("; ".join(errors))


def diffusers_scheduler(parts: SDXLParts, cfg: EvalConfig, seed: int | None = None):
    """(scheduler, sigmas or None): the sampler's diffusers scheduler, with ComfyUI's sigmas where it takes them.

    `seed` seeds DPMSolverSDEScheduler's Brownian tree (ComfyUI seeds it with the prompt's seed)."""
    check_diffusers_backend(cfg, parts.scheduler.config)
    sampler, schedule = sampler_names.resolve_shortcut(cfg.sampler_name, cfg.scheduler)
    class_name, options, custom = sampler_names.diffusers_route(sampler, schedule)
    if schedule not in schedules.SCHEDULER_NAMES:  # a class name: diffusers' own schedule, as a plain pipeline
        if class_name not in {c for c, _ in sampler_names.DIFFUSERS_SAMPLERS.values()}:
            log.info("eval: %s is its own sampler; eval.sampler_name %r is not used", class_name, sampler)
        return sampler_names.diffusers_scheduler_class(class_name).from_config(parts.scheduler.config, **options), None
    cls = comfyui_scheduler_class(sampler_names.diffusers_scheduler_class(class_name))
    if class_name == "DPMSolverSDEScheduler":
        options["noise_sampler_seed"] = seed
    scheduler = cls.from_config(parts.scheduler.config, **options)
    if not custom:
        return scheduler, None
    table = schedules.sigmas_from_scheduler_config(parts.scheduler.config)
    return scheduler, schedules.sampling_sigmas(sampler, schedule, table, cfg.num_inference_steps).tolist()


def diffusers_latents(parts: SDXLParts, cfg: EvalConfig, prompt: EvalPrompt,
                      progress: Progress | None = None) -> torch.Tensor:
    """Latents from StableDiffusionXLPipeline with the mapped scheduler."""
    from diffusers import StableDiffusionXLPipeline
    scheduler, sigmas = diffusers_scheduler(parts, cfg, prompt.seed)
    pipe = StableDiffusionXLPipeline(vae=parts.vae, text_encoder=parts.text_encoder,
                                     text_encoder_2=parts.text_encoder_2, tokenizer=parts.tokenizer,
                                     tokenizer_2=parts.tokenizer_2, unet=parts.unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=True)
    pipe.set_progress_bar_config(disable=True)
    steps = {"sigmas": sigmas} if sigmas is not None else {"num_inference_steps": cfg.num_inference_steps}
    # negative_prompt None is the pipeline's own "empty": zeroed embeddings (force_zeros_for_empty_prompt)
    negative = None if zeroed_negative(cfg, prompt) else prompt.negative_prompt
    device = parts.unet.device
    if progress is not None:
        def step_done(pipe, i: int, t, tensors: dict) -> dict:
            progress(i + 1, pipe.num_timesteps)
            return {}
        steps["callback_on_step_end"] = step_done
    with warnings.catch_warnings():  # DPMSolverSDEScheduler's torchsde, as in sample_kdiffusion
        warnings.filterwarnings("ignore", message="Should have t")
        return pipe(prompt.prompt, negative_prompt=negative, height=prompt.height, width=prompt.width,
                    guidance_scale=cfg.cfg_scale, latents=initial_noise(prompt, device).to(parts.unet.dtype),
                    generator=torch.Generator(device).manual_seed(prompt.seed), output_type="latent",
                    **steps).images


def sample_diffusers(parts: SDXLParts, cfg: EvalConfig, prompt: EvalPrompt,
                     progress: Progress | None = None) -> np.ndarray:
    """An image [H, W, 3] in [0, 1] from diffusers_latents()."""
    # an fp32 VAE stays fp32 under fp16 autocast
    return decode(parts.vae, diffusers_latents(parts, cfg, prompt, progress))


@torch.no_grad()
def decode(vae, latents: torch.Tensor) -> np.ndarray:
    """Latents -> image [H, W, 3] in [0, 1]."""
    with vae_precision(vae):
        image = vae.decode((latents / vae.config.scaling_factor).to(vae.device, vae.dtype)).sample.float()
    return (image[0].permute(1, 2, 0) / 2 + 0.5).clamp(0, 1).cpu().numpy()

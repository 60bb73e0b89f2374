"""ComfyUI/diffusers sampler and scheduler names: which pairs run on which backend, and how close to ComfyUI.

No torch here: the config check reads these names before the heavy libraries are imported (sdxl_ff/eval/schedules.py
holds the sigma sequences they mean and re-exports every name).
"""

from __future__ import annotations

from sdxl_ff.config.value_checks import did_you_mean

SCHEDULER_NAMES = ("normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform", "beta",
                   "linear_quadratic", "kl_optimal")
# ComfyUI computes one more step for these samplers and drops the second-to-last sigma.
DISCARD_PENULTIMATE_SIGMA = frozenset({"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"})
# ComfyUI's zero-terminal-SNR schedule keeps ᾱ_T slightly above 0 so sigma_max stays finite.
ZSNR_LAST_ALPHA_BAR = 4.8973451890853435e-08

# sampler name -> (k-diffusion function, extra keyword arguments); ComfyUI runs `ddim` as euler.
KDIFFUSION_SAMPLERS: dict[str, tuple[str, dict]] = {
    "euler": ("sample_euler", {}), "euler_ancestral": ("sample_euler_ancestral", {}),
    "heun": ("sample_heun", {}), "dpm_2": ("sample_dpm_2", {}),
    "dpm_2_ancestral": ("sample_dpm_2_ancestral", {}), "lms": ("sample_lms", {}),
    "dpmpp_2s_ancestral": ("sample_dpmpp_2s_ancestral", {}), "dpmpp_sde": ("sample_dpmpp_sde", {}),
    "dpmpp_2m": ("sample_dpmpp_2m", {}), "dpmpp_2m_sde": ("sample_dpmpp_2m_sde", {}),
    "dpmpp_2m_sde_heun": ("sample_dpmpp_2m_sde", {"solver_type": "heun"}),
    "dpmpp_3m_sde": ("sample_dpmpp_3m_sde", {}), "ddim": ("sample_euler", {}),
}
# samplers whose k-diffusion function draws fresh noise (they take a noise_sampler)
STOCHASTIC_SAMPLERS = frozenset({"euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde",
                                 "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde"})
# samplers ComfyUI drives with a Brownian tree seeded from the noise seed (the rest use plain randn)
BROWNIAN_SAMPLERS = frozenset({"dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde"})

# sampler name -> (diffusers scheduler class, config options)
DIFFUSERS_SAMPLERS: dict[str, tuple[str, dict]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "ddim": ("EulerDiscreteScheduler", {}),  # ComfyUI's ddim is the euler step; Euler takes custom sigmas
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_ancestral": ("KDPM2AncestralDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler",
                     {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "solver_type": "midpoint"}),
    "dpmpp_2m_sde_heun": ("DPMSolverMultistepScheduler",
                          {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "solver_type": "heun"}),
    # ComfyUI's 3M SDE takes its second step with the heun-type coefficient and stays third order up to the last
    # step (diffusers lowers the order of the last two steps below 15 steps unless lower_order_final is off)
    "dpmpp_3m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3,
                                                     "solver_type": "heun", "lower_order_final": False}),
    "dpmpp_sde": ("DPMSolverSDEScheduler", {}),
    # ComfyUI's uni_pc is the bh1 variant, but diffusers 0.42.1's bh1 turns SDXL latents into NaN: bh2 here
    "uni_pc": ("UniPCMultistepScheduler", {"solver_type": "bh2"}),
}
# These diffusers classes walk ComfyUI's exact sigma sequence and timesteps (evaluation.comfyui_scheduler_class()).
# (EulerAncestral must be here: diffusers 0.42.1's has no use_karras_sigmas/use_exponential_sigmas option.)
CUSTOM_SIGMA_CLASSES = frozenset({"EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "LMSDiscreteScheduler",
                                  "DPMSolverMultistepScheduler"})
# diffusers classes that sample in variance-preserving space: their start noise is unit noise, not scaled by sigma
VP_SPACE_CLASSES = frozenset({"DPMSolverMultistepScheduler", "UniPCMultistepScheduler"})
# The seed's eval.scheduler shortcuts: a diffusers scheduler's short name (euler = EulerDiscreteScheduler) read as
# ComfyUI does, i.e. that sampler on the `normal` schedule, so both backends walk the same sigmas.
SCHEDULER_SHORTCUTS: dict[str, str] = {"euler": "euler", "lms": "lms"}
SHORTCUT_SCHEDULE = "normal"
# eval.sampler_name's default: left at it, a shortcut picks the sampler; any other sampler conflicts.
DEFAULT_SAMPLER = "euler"
# Other classes reach ComfyUI's sequence only through their own options, with the full sigma range:
# diffusers' karras/exponential span in_sigmas[-1]..in_sigmas[0], which is ComfyUI's sigma_min..sigma_max
# only with "linspace" spacing (SDXL's default "leading" stops short of both ends).
DIFFUSERS_SCHEDULER_OPTIONS: dict[str, dict] = {
    "karras": {"use_karras_sigmas": True, "timestep_spacing": "linspace"},
    "exponential": {"use_exponential_sigmas": True, "timestep_spacing": "linspace"},
}


# How close a preview's latents are to ComfyUI's (tests/eval/test_comfy_reference.py, docs/evaluation-and-comfyui.md):
# max |Δ| / max(1, max |latent|). k-diffusion: bit-identical for most pairs; the SDE samplers' update formulas
# round differently from ComfyUI's, which ill-conditioned schedules (linear_quadratic) magnify.
KDIFFUSION_TOLERANCE = 2e-3
# diffusers: these walk ComfyUI's sigmas and timesteps and draw ComfyUI's noise. The others are not ComfyUI's
# image: heun, dpmpp_sde feed fractional timesteps; dpm_2, dpm_2_ancestral, uni_pc keep the penultimate sigma;
# the dpmpp_*m_sde samplers draw their noise themselves, not from ComfyUI's Brownian tree (their deterministic
# part is ComfyUI's: tests/eval/test_comfy_reference.py, on identical noise).
DIFFUSERS_TOLERANCE = {"euler": 1e-3, "ddim": 1e-3, "euler_ancestral": 1e-3, "lms": 1e-3, "dpmpp_2m": 1e-3}
# diffusers' uni_pc is ComfyUI's uni_pc_bh2 (diffusers 0.42.1's bh1 turns SDXL latents into NaN)
COMFYUI_NAME = {("diffusers", "uni_pc"): "uni_pc_bh2"}


def comfyui_tolerance(backend: str, sampler: str) -> float | None:
    """The relative tolerance to which `sampler` on `backend` gives ComfyUI's latents; None: not ComfyUI's image."""
    return KDIFFUSION_TOLERANCE if backend == "kdiffusion" else DIFFUSERS_TOLERANCE.get(sampler)


# --------------------------------------------------------------------------- names per backend

def diffusers_scheduler_class(name: str):
    """The diffusers scheduler class called `name`, or None."""
    import diffusers
    from diffusers import SchedulerMixin
    cls = getattr(diffusers, name, None)
    return cls if isinstance(cls, type) and issubclass(cls, SchedulerMixin) else None


def resolve_shortcut(sampler: str, scheduler: str) -> tuple[str, str]:
    """(sampler, scheduler) to run: a scheduler shortcut becomes its sampler on the `normal` schedule."""
    if scheduler in SCHEDULER_SHORTCUTS:
        return SCHEDULER_SHORTCUTS[scheduler], SHORTCUT_SCHEDULE
    return sampler, scheduler


def diffusers_route(sampler: str, scheduler: str) -> tuple[str, dict, bool]:
    """(diffusers class, its config options, pass ComfyUI's sigmas as `sigmas=`) for a valid pair."""
    if scheduler not in SCHEDULER_NAMES:  # a diffusers class name: that class with the model's own schedule
        options = DIFFUSERS_SAMPLERS[sampler][1] if DIFFUSERS_SAMPLERS[sampler][0] == scheduler else {}
        return scheduler, dict(options), False
    cls, options = DIFFUSERS_SAMPLERS[sampler]
    if cls in CUSTOM_SIGMA_CLASSES:
        return cls, dict(options), True
    return cls, {**options, **DIFFUSERS_SCHEDULER_OPTIONS[scheduler]}, False


def _shortcut_errors(sampler: str, scheduler: str) -> list[str]:
    shortcut_sampler = SCHEDULER_SHORTCUTS[scheduler]
    if sampler in (shortcut_sampler, DEFAULT_SAMPLER):
        return []
    return [f"eval.scheduler: {scheduler!r} is the shortcut for sampler {shortcut_sampler!r} on the "
            f"{SHORTCUT_SCHEDULE!r} schedule, but eval.sampler_name is {sampler!r}; to run {sampler!r} set "
            f"eval.scheduler to a schedule ({', '.join(SCHEDULER_NAMES)}), or set eval.sampler_name to "
            f"{shortcut_sampler!r}"]


def _diffusers_class_names() -> list[str]:
    import diffusers
    return sorted(name for name in dir(diffusers) if name.endswith("Scheduler"))


def model_schedule_errors(backend: str, sampler: str, scheduler: str, zero_terminal_snr: bool) -> list[str]:
    """Errors for a valid (sampler, scheduler) pair that cannot walk ComfyUI's schedule of this model.

    With zero terminal SNR ComfyUI's sigma_max is 4518.8; diffusers' classes outside CUSTOM_SIGMA_CLASSES build
    their own range (without rescale_betas_zero_snr: 14.6; UniPC's rescale: 4096), so they would sample a
    different schedule than the one named.
    """
    sampler, scheduler = resolve_shortcut(sampler, scheduler)
    if backend != "diffusers" or not zero_terminal_snr or scheduler not in SCHEDULER_NAMES:
        return []
    cls = DIFFUSERS_SAMPLERS.get(sampler, ("",))[0]
    if cls in CUSTOM_SIGMA_CLASSES or not cls:
        return []
    exact = sorted(s for s, (c, _) in DIFFUSERS_SAMPLERS.items() if c in CUSTOM_SIGMA_CLASSES)
    return [f"eval.sampler_name: {sampler!r} on eval.backend \"diffusers\" uses diffusers' {cls}, which cannot walk "
            f"ComfyUI's zero-terminal-SNR schedule (sigma_max 4518.8) of this model; set eval.backend to "
            f"\"kdiffusion\" (exact for every sampler), or use a sampler among {', '.join(exact)}"]


def eval_name_errors(backend: str, sampler: str, scheduler: str) -> list[str]:
    """Config errors for eval.sampler_name / eval.scheduler on `backend`; empty when the pair runs."""
    samplers = KDIFFUSION_SAMPLERS if backend == "kdiffusion" else DIFFUSERS_SAMPLERS
    errors = []
    if sampler not in samplers:
        errors.append(f"eval.sampler_name: {sampler!r} is not a sampler of eval.backend {backend!r}; "
                      f"valid: {', '.join(samplers)}{did_you_mean(sampler, list(samplers))}")
    if scheduler in SCHEDULER_SHORTCUTS:
        errors += _shortcut_errors(sampler, scheduler)
        if errors:
            return errors
        sampler, scheduler = resolve_shortcut(sampler, scheduler)
    names = [*SCHEDULER_NAMES, *SCHEDULER_SHORTCUTS]
    if backend == "kdiffusion":
        if scheduler not in SCHEDULER_NAMES:
            errors.append(f"eval.scheduler: {scheduler!r} is not a scheduler of eval.backend 'kdiffusion'; "
                          f"valid: {', '.join(names)}{did_you_mean(scheduler, names)}")
        return errors
    if scheduler in SCHEDULER_NAMES:
        if errors:
            return errors
        cls = DIFFUSERS_SAMPLERS[sampler][0]
        if cls not in CUSTOM_SIGMA_CLASSES and scheduler not in DIFFUSERS_SCHEDULER_OPTIONS:
            exact = sorted(s for s, (c, _) in DIFFUSERS_SAMPLERS.items() if c in CUSTOM_SIGMA_CLASSES)
            errors.append(
                f"eval.scheduler: {scheduler!r} with sampler {sampler!r} cannot be reproduced by diffusers' {cls} "
                f"(it takes no custom sigma sequence); use eval.backend \"kdiffusion\", a scheduler among "
                f"{', '.join(DIFFUSERS_SCHEDULER_OPTIONS)}, or a sampler among {', '.join(exact)}")
        return errors
    cls = diffusers_scheduler_class(scheduler)
    if cls is None:
        errors.append(f"eval.scheduler: {scheduler!r} is neither a ComfyUI scheduler ({', '.join(SCHEDULER_NAMES)}), "
                      f"a shortcut ({', '.join(SCHEDULER_SHORTCUTS)}) nor a diffusers scheduler class "
                      f"(e.g. EulerDiscreteScheduler, DPMSolverMultistepScheduler)"
                      f"{did_you_mean(scheduler, names + _diffusers_class_names())}")
    elif not errors:
        own = [s for s, (c, _) in DIFFUSERS_SAMPLERS.items() if c == scheduler]
        if own and sampler not in own:
            errors.append(f"eval.scheduler: {scheduler} runs the samplers {', '.join(own)}, not {sampler!r}; "
                          f"set eval.sampler_name to one of them")
    return errors

"""The preview is ComfyUI's image: the project's eval path against latents made by ComfyUI's own code.

tests/reference/comfy_reference.safetensors was written by tests/reference/make_comfy_reference.py, which imports
ComfyUI's comfy/samplers.py, comfy/k_diffusion/sampling.py, comfy/model_sampling.py, comfy/sample.py and
comfy/extra_samplers/uni_pc.py at the commit stored in its metadata (Comfy-Org/ComfyUI
a125cd84b054a57729b5eecab930ca9408719832) and runs KSampler's sigmas, its noise and sampler functions with
the built-in tiny SDXL UNet as the network. Here the same UNet goes through run_eval's sampling functions
(sample_kdiffusion / diffusers_latents) with the same seed, prompt, negative, steps and cfg.
"""

import copy
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sdxl_ff.config import sampler_names
from sdxl_ff.config.errors import ConfigError
from sdxl_ff.config.schema import EvalConfig
from sdxl_ff.eval import backends as eb
from sdxl_ff.eval import schedules
from sdxl_ff.eval.backends import EvalPrompt
from sdxl_ff.model.parts import build_tiny_sdxl, configure_inference_scheduler

PATH = Path(__file__).parents[1] / "reference" / "comfy_reference.safetensors"
REF = load_file(PATH)
META = safe_open(PATH, "pt").metadata()
COMFYUI_COMMIT = "a125cd84b054a57729b5eecab930ca9408719832"
MODELS = {"eps": ("epsilon", False), "v": ("v_prediction", False), "v_ztsnr": ("v_prediction", True)}
PROMPT = EvalPrompt(0, META["prompt"], META["negative_prompt"], int(META["seed"]), int(META["size"]),
                    int(META["size"]))
# The stored data was computed on one CPU; PyTorch picks other vector kernels (exp, log, pow, tan, randn's
# Box-Muller) on others, so each comparison with it has a tolerance. Measured here against the stored values with
# ATEN_CPU_CAPABILITY=default / avx2 / avx512 on an AMD EPYC (float32 eps = 1.19e-7):
EPS = torch.finfo(torch.float32).eps
# Sigma tables, relative: ≤ 1.0 eps with avx2/avx512; with `default` 4.2 eps (normal, exponential, sgm_uniform:
# an exp of an interpolated log) and 12.9 eps for karras, whose outer power ρ = 7 multiplies its base's relative
# error by 7. Bound: 8 eps, and 7 × 8 eps for karras (2× and 4× margin). Zeros and the terminal 0 stay exact.
SIGMA_RTOL = {"karras": 7 * 8 * EPS}
SIGMA_RTOL_DEFAULT = 8 * EPS
# Start noise, absolute (values |x| < 4): 0 with avx2/avx512, 10 eps (1.19e-6) with `default`; bound 32 eps.
NOISE_ATOL = 32 * EPS
# Latents: sampler_names.comfyui_tolerance(), except these v + zero-terminal-SNR pairs, the worst across the three
# kernel sets (`sens` = the latents' change when every sigma moves by 1 ulp, measured here):
# dpm_2/kl_optimal 4.93e-3 with `default`, whose kl_optimal sigmas are 1 ulp off (sens 5.0e-3): bound 1e-2;
# dpm_2/normal 1.65e-3 (sens 2.9e-3): bound 6e-3; dpmpp_2s_ancestral/kl_optimal 3.49e-2 with every kernel set on
# AMD EPYC (passes on the CPU that wrote the file), yet with ComfyUI's own sigmas, and with 1-ulp (or 16 ulps of
# max |x|) perturbations of the sigmas, the start noise or the denoiser output it moves by ≤ 1e-5. ComfyUI's own
# code (tests/reference/make_comfy_reference.py at COMMIT) run on that AMD EPYC gives latents bit-identical to ours for
# this pair, 3.494e-2 from the stored ones: the pair differs across CPUs in ComfyUI itself (the MKL and oneDNN
# instruction caps do not move it); bound 7e-2 (2×), kept visible here rather than hidden.
CROSS_CPU_TOLERANCE = {("v_ztsnr", "dpm_2", "kl_optimal"): 1e-2, ("v_ztsnr", "dpm_2", "normal"): 6e-3,
                       ("v_ztsnr", "dpmpp_2s_ancestral", "kl_optimal"): 7e-2}


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_sdxl(0)


def model_parts(tiny, model: str):
    parts = copy.copy(tiny)
    parts.scheduler = configure_inference_scheduler(tiny.scheduler, *MODELS[model])
    return parts


def eval_config(backend: str, sampler: str, scheduler: str, **extra) -> EvalConfig:
    return EvalConfig(backend=backend, sampler_name=sampler, scheduler=scheduler,
                      num_inference_steps=int(META["steps"]), cfg_scale=float(META["cfg"]), **extra)


def latents(parts, cfg: EvalConfig, prompt: EvalPrompt = PROMPT) -> torch.Tensor:
    with torch.inference_mode():
        if cfg.backend == "kdiffusion":
            return eb.sample_kdiffusion(parts, cfg, prompt)
        return eb.diffusers_latents(parts, cfg, prompt).float()


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().max() / expected.abs().max().clamp(min=1.0))


def test_reference_is_comfyuis_own_output_at_the_pinned_commit():
    assert META["comfyui_commit"] == COMFYUI_COMMIT
    assert PATH.stat().st_size < 1_000_000
    torch.testing.assert_close(eb.initial_noise(PROMPT, torch.device("cpu")), REF["noise"], rtol=0, atol=NOISE_ATOL)


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("scheduler", schedules.SCHEDULER_NAMES)
def test_sigmas_and_timesteps_equal_comfyui(model, scheduler):
    table = schedules.discrete_sigmas(zero_terminal_snr=MODELS[model][1])
    for sampler in ("euler", "dpm_2"):  # dpm_2: ComfyUI's discarded penultimate sigma
        for steps in (1, 2, 3, 4, 7, 10, 20, 30, 50):
            key = f"{model}/{scheduler}/{sampler}/{steps}"
            got = schedules.sampling_sigmas(sampler, scheduler, table, steps)
            torch.testing.assert_close(got, REF[f"sigmas/{key}"], rtol=SIGMA_RTOL.get(scheduler, SIGMA_RTOL_DEFAULT),
                                       atol=0, equal_nan=True, msg=key)
            # integers, equal with all three kernel sets: a 1-ulp log difference moves no sigma across a midpoint
            positive = REF[f"sigmas/{key}"][REF[f"sigmas/{key}"] > 0]
            assert torch.equal(schedules.sigma_to_timestep(positive, table), REF[f"timesteps/{key}"]), key


def test_timestep_at_an_exact_log_midpoint_is_comfyuis():
    """sgm_uniform on zero-terminal SNR asks for timestep 499.5, a log-midpoint; with ComfyUI's float32 logs of the
    float64 table the sigma rounds to timestep 499, with logs of the float32 table (before) to 500."""
    table = schedules.discrete_sigmas(zero_terminal_snr=True)
    sigmas = schedules.sampling_sigmas("euler", "sgm_uniform", table, 2)
    torch.testing.assert_close(sigmas, REF["sigmas/v_ztsnr/sgm_uniform/euler/2"], rtol=SIGMA_RTOL_DEFAULT, atol=0)
    assert REF["timesteps/v_ztsnr/sgm_uniform/euler/2"].tolist() == [999, 499]
    assert schedules.sigma_to_timestep(sigmas[:2], table).tolist() == [999, 499]
    logs = table.float().log()  # the rounding this guards against
    midpoint = (0.5 * logs[499] + 0.5 * logs[500]).exp()
    assert int((midpoint.log() - logs).abs().argmin()) == 500


def exact_pairs(backend: str, model: str) -> list[tuple[str, str]]:
    """Every (sampler, scheduler) pair that `backend` accepts for this model and that the docs list as equal."""
    samplers = sampler_names.KDIFFUSION_SAMPLERS if backend == "kdiffusion" else sampler_names.DIFFUSERS_SAMPLERS
    return [(s, sch) for s in samplers for sch in schedules.SCHEDULER_NAMES
            if not sampler_names.eval_name_errors(backend, s, sch)
            and not sampler_names.model_schedule_errors(backend, s, sch, MODELS[model][1])
            and sampler_names.comfyui_tolerance(backend, s) is not None]


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("backend", ["kdiffusion", "diffusers"])
def test_every_pair_gives_comfyuis_latents(tiny, backend, model):
    parts = model_parts(tiny, model)
    pairs = exact_pairs(backend, model)
    # every scheduler with every k-diffusion sampler; on diffusers with euler, ddim, euler_ancestral, lms, dpmpp_2m
    assert len(pairs) == 9 * (13 if backend == "kdiffusion" else 5)
    failures = []
    for sampler, scheduler in pairs:
        got = latents(parts, eval_config(backend, sampler, scheduler))
        reference = sampler_names.COMFYUI_NAME.get((backend, sampler), sampler)
        error = relative_error(got, REF[f"latents/{model}/{reference}/{scheduler}"])
        tolerance = CROSS_CPU_TOLERANCE.get((model, sampler, scheduler),
                                            sampler_names.comfyui_tolerance(backend, sampler))
        if not error <= tolerance:
            failures.append(f"{sampler}/{scheduler}: {error:.2e}")
    assert not failures, failures


@pytest.mark.parametrize("model", ["eps", "v_ztsnr"])
def test_diffusers_sde_samplers_are_comfyuis_on_identical_noise(tiny, model, monkeypatch):
    """diffusers' SDE samplers draw their noise themselves (not from ComfyUI's Brownian tree); with it at zero and
    ComfyUI's s_noise at 0 the rest of each step is ComfyUI's, the third-order step of dpmpp_3m_sde included."""
    import diffusers.schedulers.scheduling_dpmsolver_multistep as dpm
    monkeypatch.setattr(dpm, "randn_tensor", lambda shape, **kw: torch.zeros(shape, dtype=kw.get("dtype")))
    parts = model_parts(tiny, model)
    for sampler in ("dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde"):
        for scheduler in schedules.SCHEDULER_NAMES:
            got = latents(parts, eval_config("diffusers", sampler, scheduler))
            error = relative_error(got, REF[f"noiseless/{model}/{sampler}/{scheduler}"])
            assert error < 1e-4, (sampler, scheduler, error)


def test_ancestral_noise_is_drawn_as_comfyui_draws_it(tiny):
    """ComfyUI's default noise sampler: randn on x's device from a generator seeded with the seed itself."""
    parts = model_parts(tiny, "eps")
    x = torch.zeros(1, 4, 8, 8)
    draw = eb.comfy_noise_sampler("euler_ancestral", x, torch.tensor([2.0, 1.0, 0.0]), seed=42)
    expected = torch.Generator().manual_seed(42)
    first, second = draw(None, None), draw(None, None)
    assert torch.equal(first, torch.randn(1, 4, 8, 8, generator=expected))
    assert torch.equal(second, torch.randn(1, 4, 8, 8, generator=expected))
    seed_plus_one = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(43))
    assert not torch.equal(first, seed_plus_one)  # what the preview used before
    got = latents(parts, eval_config("kdiffusion", "euler_ancestral", "karras"))
    assert relative_error(got, REF["latents/eps/euler_ancestral/karras"]) < 1e-5  # ≤ 1.4e-6 on all 3 kernel sets


@pytest.mark.parametrize("sampler", ["heun", "dpm_2", "dpm_2_ancestral", "dpmpp_sde", "uni_pc"])
def test_diffusers_refuses_samplers_that_cannot_walk_a_zero_terminal_snr_schedule(tiny, sampler):
    parts = model_parts(tiny, "v_ztsnr")
    with pytest.raises(ConfigError, match=f"'{sampler}' on eval.backend \"diffusers\" uses diffusers' .* cannot "
                                          "walk ComfyUI's zero-terminal-SNR schedule .*set eval.backend to "
                                          "\"kdiffusion\""):
        eb.diffusers_scheduler(parts, eval_config("diffusers", sampler, "karras"))
    assert not sampler_names.model_schedule_errors("diffusers", sampler, "karras", False)
    assert not sampler_names.model_schedule_errors("kdiffusion", sampler, "karras", True)


@pytest.mark.parametrize("sampler", ["heun", "dpm_2", "dpmpp_sde"])
def test_diffusers_start_noise_is_comfyuis_sqrt_one_plus_sigma_max_squared(tiny, sampler):
    parts = model_parts(tiny, "eps")
    scheduler, _ = eb.diffusers_scheduler(parts, eval_config("diffusers", sampler, "karras"))
    scheduler.set_timesteps(4)
    sigma_max = float(schedules.discrete_sigmas()[-1].float())
    assert float(scheduler.init_noise_sigma) == pytest.approx(math.sqrt(1 + sigma_max ** 2), rel=1e-6)


def test_lms_ends_on_the_denoised_sample_on_both_backends(tiny):
    parts = model_parts(tiny, "eps")
    for backend in ("kdiffusion", "diffusers"):
        for scheduler in ("karras", "normal"):
            got = latents(parts, eval_config(backend, "lms", scheduler))
            # measured ≤ 1.5e-6 with ATEN_CPU_CAPABILITY default, avx2 and avx512
            assert relative_error(got, REF[f"latents/eps/lms/{scheduler}"]) < 1e-5, (backend, scheduler)


def test_empty_negative_zeros_is_what_a_plain_diffusers_pipeline_makes(tiny):
    """The exported model_index.json says force_zeros_for_empty_prompt: a plain pipeline call zeroes an empty
    negative; the diffusers backend does the same by default, and `encoded` gives ComfyUI's encoded ""."""
    from diffusers import StableDiffusionXLPipeline
    parts = model_parts(tiny, "eps")
    prompt = EvalPrompt(0, "a red circle on a green background", "", seed=5, height=64, width=64)
    plain = StableDiffusionXLPipeline(vae=parts.vae, text_encoder=parts.text_encoder,
                                      text_encoder_2=parts.text_encoder_2, tokenizer=parts.tokenizer,
                                      tokenizer_2=parts.tokenizer_2, unet=parts.unet, scheduler=parts.scheduler)
    assert plain.config.force_zeros_for_empty_prompt
    plain.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        expected = plain(prompt.prompt, height=64, width=64, guidance_scale=4.5, num_inference_steps=4,
                         generator=torch.Generator().manual_seed(5), output_type="latent").images
    own = eval_config("diffusers", "euler", "EulerDiscreteScheduler")
    assert eb.empty_negative(own) == "zeros"
    assert torch.equal(latents(parts, own, prompt), expected)
    encoded = latents(parts, eval_config("diffusers", "euler", "EulerDiscreteScheduler", empty_negative="encoded"),
                      prompt)
    assert (encoded - expected).abs().max() > 1e-3
    # kdiffusion encodes "" by default (ComfyUI's empty CLIPTextEncode); `zeros` there is the pipeline's negative
    kd = eval_config("kdiffusion", "euler", "normal")
    assert eb.empty_negative(kd) == "encoded"
    df = eval_config("diffusers", "euler", "normal")
    encoded_df = latents(parts, eval_config("diffusers", "euler", "normal", empty_negative="encoded"), prompt)
    assert relative_error(latents(parts, kd, prompt), encoded_df) < 1e-4  # the backends agree to float rounding
    zeros = latents(parts, eval_config("kdiffusion", "euler", "normal", empty_negative="zeros"), prompt)
    assert relative_error(zeros, latents(parts, df, prompt)) < 1e-4
    assert relative_error(zeros, encoded_df) > 1e-3
    # a non-empty negative is always encoded
    negative = EvalPrompt(0, prompt.prompt, "blue", seed=5, height=64, width=64)
    assert torch.equal(latents(parts, eval_config("kdiffusion", "euler", "normal", empty_negative="zeros"), negative),
                       latents(parts, kd, negative))


def test_empty_negative_values_are_checked():
    from sdxl_ff.config.load import load_config
    with pytest.raises(ConfigError, match="eval.empty_negative"):
        load_config(None, ["training.num_steps=1", "run.name=x", "eval.empty_negative=zero"])
    valid = ["training.num_steps=1", "run.name=x", "model.train_text_encoder_1=false", "eval.empty_negative=encoded"]
    assert load_config(None, valid).eval.empty_negative == "encoded"

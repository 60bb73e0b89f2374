"""Write tests/reference/comfy_reference.safetensors by running ComfyUI's own sampling code at a pinned commit.

Nothing here re-derives ComfyUI's maths: the files below are read from a ComfyUI checkout at COMMIT and
imported as the `comfy` package (its unrelated imports -- model management, hooks, patchers -- are empty
stand-in modules, since sampling never calls them). What runs is ComfyUI's:
  comfy/model_sampling.py    ModelSamplingDiscrete + EPS / V_PREDICTION (zsnr), timestep(), noise_scaling()
  comfy/samplers.py          KSampler.calculate_sigmas (scheduler handlers, discarded penultimate sigma),
                             sampler_object() / KSAMPLER.sample, cfg_function
  comfy/k_diffusion/sampling.py  every sampler, default_noise_sampler, BrownianTreeNoiseSampler
  comfy/extra_samplers/uni_pc.py uni_pc, uni_pc_bh2
  comfy/sample.py            prepare_noise (the initial noise from the seed)
The only code written here is the stand-in for ComfyUI's model wrapper: BaseModel._apply_model's four lines
(calculate_input, timestep().float(), the network, calculate_denoised) and the cond/uncond pair that
CFGGuider.predict_noise batches; the network is the project's built-in tiny SDXL UNet (seed 0), the same
"toy denoiser" the tests run through the project's eval path.

Run (about a minute): python tests/reference/make_comfy_reference.py <ComfyUI git dir> [commit]
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

COMMIT = "a125cd84b054a57729b5eecab930ca9408719832"  # Comfy-Org/ComfyUI, 2025-10-12
FILES = ("comfy/samplers.py", "comfy/model_sampling.py", "comfy/sample.py", "comfy/k_diffusion/sampling.py",
         "comfy/k_diffusion/utils.py", "comfy/k_diffusion/deis.py", "comfy/k_diffusion/sa_solver.py",
         "comfy/extra_samplers/uni_pc.py", "comfy/ldm/modules/diffusionmodules/util.py")
STUBS = ("comfy.model_management", "comfy.sampler_helpers", "comfy.model_patcher", "comfy.patcher_extension",
         "comfy.hooks", "comfy.context_windows", "comfy.utils", "comfy.ldm.util")
SAMPLERS = ("euler", "euler_ancestral", "heun", "dpm_2", "dpm_2_ancestral", "lms", "dpmpp_2s_ancestral",
            "dpmpp_sde", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde", "ddim", "uni_pc",
            "uni_pc_bh2")
NOISELESS = ("dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde")
MODELS = {"eps": ("EPS", False), "v": ("V_PREDICTION", False), "v_ztsnr": ("V_PREDICTION", True)}
SIGMA_STEPS = (1, 2, 3, 4, 7, 10, 20, 30, 50)
STEPS, SEED, CFG = 4, 42, 4.5
PROMPT, NEGATIVE, SIZE = "a red circle on a green background", "blue", 64


def import_comfy(git_dir: str, commit: str):
    tmp = Path(tempfile.mkdtemp(prefix="comfy_ref_"))
    for name in FILES:
        text = subprocess.run(["git", "--git-dir", git_dir, "show", f"{commit}:{name}"], check=True,
                              capture_output=True, text=True).stdout
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_text(text)
    for package in {Path(n).parent for n in FILES}:
        for part in [package, *package.parents][:-1]:
            (tmp / part / "__init__.py").touch()
    for name in STUBS:
        module = types.ModuleType(name)
        module.instantiate_from_config = None
        sys.modules[name] = module
    sys.path.insert(0, str(tmp))
    import comfy.k_diffusion.sampling
    import comfy.model_sampling
    import comfy.sample
    import comfy.samplers
    return comfy


class Patcher:
    """What KSampler and the SDE samplers ask of ComfyUI's ModelPatcher: the model's model_sampling."""

    def __init__(self, model_sampling):
        self.model_sampling = model_sampling

    def get_model_object(self, name):
        assert name == "model_sampling"
        return self.model_sampling


class BaseModel:
    """ComfyUI's BaseModel._apply_model around the tiny UNet (SDXL's context + pooled/time-id conditioning).

    ComfyUI's calc_cond_batch runs cond and uncond as one batch; so does this, [uncond, cond] in one UNet
    call as the project does, so that both sides evaluate the very same network function."""

    def __init__(self, model_sampling, unet):
        self.model_sampling, self.unet = model_sampling, unet

    def apply_model_pair(self, x, sigma, uncond, cond):
        xc = self.model_sampling.calculate_input(sigma, x)
        t = self.model_sampling.timestep(sigma).float()
        embeds, pooled, time_ids = (torch.cat(pair) for pair in zip(uncond, cond, strict=True))
        out = self.unet(torch.cat([xc, xc]), torch.cat([t, t]), embeds,
                        added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample.float()
        return [self.model_sampling.calculate_denoised(sigma, o, x) for o in out.chunk(2)]


class Guider:
    """CFGGuider's role: cond and uncond denoised, combined by ComfyUI's cfg_function."""

    def __init__(self, comfy, base, cond, uncond, cfg):
        self.comfy, self.inner_model, self.model_patcher = comfy, base, Patcher(base.model_sampling)
        self.cond, self.uncond, self.cfg = cond, uncond, cfg

    def __call__(self, x, sigma, model_options={}, seed=None):  # noqa: B006 (ComfyUI's signature)
        uncond, cond = self.inner_model.apply_model_pair(x, sigma, self.uncond, self.cond)
        return self.comfy.samplers.cfg_function(self.inner_model, cond, uncond, self.cfg, x, sigma,
                                                model_options=model_options)


def main(git_dir: str, commit: str = COMMIT) -> None:
    comfy = import_comfy(git_dir, commit)
    from sdxl_ff.model.conditioning import encode_prompts, time_ids
    from sdxl_ff.model.parts import build_tiny_sdxl
    parts = build_tiny_sdxl(0)
    parts.unet.eval()
    out: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        embeds, pooled = encode_prompts([NEGATIVE, PROMPT], (parts.tokenizer, parts.tokenizer_2),
                                        (parts.text_encoder, parts.text_encoder_2), "cpu")
        ids = time_ids(torch.tensor([[SIZE, SIZE]]), torch.zeros(1, 2, dtype=torch.long), torch.tensor([[SIZE, SIZE]]))
        uncond, cond = (embeds[:1], pooled[:1], ids), (embeds[1:], pooled[1:], ids)
        latent = torch.zeros(1, 4, SIZE // 8, SIZE // 8)
        noise = comfy.sample.prepare_noise(latent, SEED)
        for model_name, (kind, zsnr) in MODELS.items():
            ms_class = type("ModelSampling", (comfy.model_sampling.ModelSamplingDiscrete,
                                              getattr(comfy.model_sampling, kind)), {})
            ms = ms_class(types.SimpleNamespace(sampling_settings={"zsnr": zsnr}))
            patcher = Patcher(ms)
            guider = Guider(comfy, BaseModel(ms, parts.unet), cond, uncond, CFG)
            for scheduler in comfy.samplers.SCHEDULER_NAMES:
                for sampler_name in ("euler", "dpm_2"):  # plain and discard-penultimate sequences
                    for steps in SIGMA_STEPS:
                        ks = comfy.samplers.KSampler(patcher, steps, "cpu", sampler_name, scheduler)
                        out[f"sigmas/{model_name}/{scheduler}/{sampler_name}/{steps}"] = ks.sigmas.float()
                        positive = ks.sigmas[ks.sigmas > 0]
                        out[f"timesteps/{model_name}/{scheduler}/{sampler_name}/{steps}"] = ms.timestep(positive)
                for sampler_name in SAMPLERS:
                    ks = comfy.samplers.KSampler(patcher, STEPS, "cpu", sampler_name, scheduler)
                    sampler = comfy.samplers.sampler_object(sampler_name)
                    samples = sampler.sample(guider, ks.sigmas, {"model_options": {}, "seed": SEED}, None,
                                             noise.clone(), latent, None, True)
                    out[f"latents/{model_name}/{sampler_name}/{scheduler}"] = samples.float().contiguous()
                    if sampler_name in NOISELESS:  # the same sampler with s_noise 0: its deterministic part
                        sampler = comfy.samplers.ksampler(sampler_name, {"s_noise": 0.0})
                        samples = sampler.sample(guider, ks.sigmas, {"model_options": {}, "seed": SEED}, None,
                                                 noise.clone(), latent, None, True)
                        out[f"noiseless/{model_name}/{sampler_name}/{scheduler}"] = samples.float().contiguous()
        out["noise"] = noise
    metadata = {"comfyui_commit": commit, "steps": str(STEPS), "seed": str(SEED), "cfg": str(CFG),
                "prompt": PROMPT, "negative_prompt": NEGATIVE, "size": str(SIZE)}
    target = Path(__file__).with_name("comfy_reference.safetensors")
    save_file({k: v.contiguous() for k, v in out.items()}, target, metadata=metadata)
    print(f"wrote {target} ({target.stat().st_size} bytes, {len(out)} tensors, ComfyUI {commit})")


if __name__ == "__main__":
    main(*sys.argv[1:])

"""Sampling on the tiny SDXL: every sampler/scheduler name per backend, repeatability, run_eval's state restore."""

import contextlib
import copy
import json

import diffusers
import numpy as np
import pytest
import torch
from conftest import ROOT, run_in_process, tiny_overrides

from sdxl_ff.config import sampler_names
from sdxl_ff.config.errors import ConfigError
from sdxl_ff.config.load import load_config
from sdxl_ff.config.schema import EvalConfig
from sdxl_ff.eval import backends as eb
from sdxl_ff.eval import evaluation as ev
from sdxl_ff.eval import schedules
from sdxl_ff.model.parts import SDXLParts, build_tiny_sdxl
from sdxl_ff.optim.ema import EMA

PROMPT = eb.EvalPrompt(0, "a red circle on a green background", "blue", seed=3, height=64, width=64)


@pytest.fixture(scope="module")
def parts():
    return build_tiny_sdxl(0)


def finite_image(parts, cfg: EvalConfig) -> np.ndarray:
    with torch.inference_mode():
        if cfg.backend == "kdiffusion":
            return ev.decode(parts.vae, ev.sample_kdiffusion(parts, cfg, PROMPT))
        return ev.sample_diffusers(parts, cfg, PROMPT)


def valid_pairs(backend: str) -> list[tuple[str, str]]:
    samplers = sampler_names.KDIFFUSION_SAMPLERS if backend == "kdiffusion" else sampler_names.DIFFUSERS_SAMPLERS
    return [(s, sch) for s in samplers for sch in schedules.SCHEDULER_NAMES
            if not sampler_names.eval_name_errors(backend, s, sch)]


def test_every_name_has_a_backend():
    kd, df = valid_pairs("kdiffusion"), valid_pairs("diffusers")
    required = {"euler", "euler_ancestral", "heun", "dpm_2", "dpm_2_ancestral", "lms", "dpmpp_2m", "dpmpp_2m_sde",
                "dpmpp_2m_sde_heun", "dpmpp_3m_sde", "dpmpp_sde", "ddim", "uni_pc"}
    assert required <= {s for s, _ in kd + df}
    assert len(kd) == len(sampler_names.KDIFFUSION_SAMPLERS) * len(schedules.SCHEDULER_NAMES)  # k-diffusion: all pairs
    assert {sch for s, sch in df if s == "euler"} == set(schedules.SCHEDULER_NAMES)  # exact via custom sigmas


@pytest.mark.parametrize("backend", ["kdiffusion", "diffusers"])
def test_every_supported_pair_gives_a_finite_image(parts, backend):
    pairs = valid_pairs(backend)
    # every sampler with karras (or its first valid scheduler) and every scheduler with euler and dpm_2
    chosen = {(s, "karras") if (s, "karras") in pairs else (s, sch) for s, sch in pairs}
    chosen |= {p for p in pairs if p[0] in ("euler", "dpm_2")}
    for sampler, scheduler in sorted(chosen):
        cfg = EvalConfig(backend=backend, sampler_name=sampler, scheduler=scheduler, num_inference_steps=3)
        image = finite_image(parts, cfg)
        assert image.shape == (64, 64, 3) and np.isfinite(image).all(), (sampler, scheduler)
        assert image.std() > 0.01, (sampler, scheduler)


@pytest.mark.parametrize("scheduler,sampler", [("EulerDiscreteScheduler", "euler"), ("DDPMScheduler", "euler"),
                                               ("DPMSolverMultistepScheduler", "dpmpp_2m_sde_heun")])
def test_diffusers_class_names_run(parts, scheduler, sampler):
    assert not sampler_names.eval_name_errors("diffusers", sampler, scheduler)
    image = finite_image(parts, EvalConfig(sampler_name=sampler, scheduler=scheduler, num_inference_steps=3))
    assert np.isfinite(image).all() and image.std() > 0.01


def test_diffusers_gets_comfyui_sigmas(parts):
    table = schedules.discrete_sigmas()
    for sampler in ("euler", "euler_ancestral", "lms", "dpmpp_2m", "dpmpp_2m_sde_heun", "dpmpp_3m_sde"):  # exact
        for scheduler in schedules.SCHEDULER_NAMES:
            sch, sigmas = eb.diffusers_scheduler(parts, EvalConfig(sampler_name=sampler, scheduler=scheduler,
                                                                   num_inference_steps=7))
            sch.set_timesteps(sigmas=sigmas)
            expected = schedules.scheduler_sigmas(scheduler, table, 7)
            assert sch.sigmas.tolist() == pytest.approx(expected.tolist(), rel=1e-6), (sampler, scheduler)
            # the UNet gets ComfyUI's integer timesteps
            assert sch.timesteps.tolist() == schedules.sigma_to_timestep(expected[:-1], table).tolist()
    for sampler in ("uni_pc",):  # the rest: diffusers' karras over the full range
        for scheduler in ("karras", "exponential"):
            sch, sigmas = eb.diffusers_scheduler(parts, EvalConfig(sampler_name=sampler, scheduler=scheduler))
            assert sigmas is None
            sch.set_timesteps(7)
            expected = schedules.scheduler_sigmas(scheduler, table, 7)
            # diffusers derives its table in float32, ComfyUI in float64: within 2e-5 relative
            assert sch.sigmas.tolist() == pytest.approx(expected.tolist(), rel=2e-5), (sampler, scheduler)


@pytest.mark.parametrize("overrides,expected", [
    (["eval.backend=kdiffusion", "eval.sampler_name=uni_pc"], "valid: euler, euler_ancestral"),
    (["eval.sampler_name=dpmpp_9m"], "'dpmpp_9m' is not a sampler of eval.backend 'diffusers'; valid: euler"),
    (["eval.backend=kdiffusion", "eval.scheduler=EulerDiscreteScheduler"], "valid: normal, karras, exponential"),
    (["eval.scheduler=fancy"], "'fancy' is neither a ComfyUI scheduler (normal, karras"),
    (["eval.sampler_name=heun", "eval.scheduler=beta"], "use eval.backend \"kdiffusion\", a scheduler among karras"),
    (["eval.sampler_name=euler", "eval.scheduler=DPMSolverMultistepScheduler"], "runs the samplers dpmpp_2m"),
    (["eval.live.enabled=true"], "eval.live.every_n_steps is not set"),
    (["eval.use_ema=true"], "model.use_ema is false"),
])
def test_unknown_or_unsupported_names_are_config_errors(overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["training.num_steps=1", "run.name=x", *overrides])
    assert expected in str(err.value)


def test_same_weights_prompt_seed_give_identical_images(parts, tmp_path):
    prompts = [PROMPT, eb.EvalPrompt(1, "a blue square", "", seed=9, height=64, width=128)]
    for cfg in (EvalConfig(backend="kdiffusion", sampler_name="dpmpp_2m_sde", scheduler="karras",
                           num_inference_steps=3),
                EvalConfig(backend="diffusers", sampler_name="euler_ancestral", scheduler="karras",
                           num_inference_steps=3)):
        first = ev.run_eval(parts, cfg, prompts, tmp_path / cfg.backend / "a")
        second = ev.run_eval(parts, cfg, prompts, tmp_path / cfg.backend / "b")
        for a, b in zip(first.paths, second.paths, strict=True):
            assert np.array_equal(np.asarray(ev.Image.open(a)), np.asarray(ev.Image.open(b)))
        assert [p.name for p in first.paths] == ["000_seed3.png", "001_seed9.png"]
        assert ev.Image.open(first.paths[1]).size == (128, 64)  # per-prompt width x height honoured
        assert first.grid.size == (256, 64) and (first.out_dir / "grid.png").is_file()
        a0, a1 = (np.asarray(ev.Image.open(p), dtype=float) for p in first.paths)
        assert np.abs(a0 - a1[:, :64]).mean() > 1  # another seed/prompt gives another image


def test_run_eval_restores_training_state(parts, tmp_path):
    unet = parts.unet
    unet.train().enable_gradient_checkpointing()
    parts.text_encoder.train()
    parts.text_encoder.requires_grad_(False)
    unet.conv_in.requires_grad_(False)
    seen = []
    hook = unet.register_forward_hook(lambda m, i, o: seen.append((m.training, torch.is_inference_mode_enabled())))
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    flags = [m.training for m in unet.modules()]
    torch.manual_seed(7)
    np.random.seed(7)
    expected_draws = (torch.rand(3), np.random.rand(3))
    torch.manual_seed(7)
    np.random.seed(7)
    try:
        ev.run_eval(parts, EvalConfig(backend="kdiffusion", sampler_name="euler_ancestral", num_inference_steps=2),
                    [PROMPT], tmp_path / "e")
    finally:
        hook.remove()
    assert seen and all(mode == (False, True) for mode in seen)  # eval mode, inference mode inside
    assert [m.training for m in unet.modules()] == flags and unet.is_gradient_checkpointing
    assert parts.text_encoder.training and not any(p.requires_grad for p in parts.text_encoder.parameters())
    assert not unet.conv_in.weight.requires_grad and unet.conv_out.weight.requires_grad
    assert all(torch.equal(before[n], p) for n, p in unet.named_parameters())
    assert torch.equal(torch.rand(3), expected_draws[0]) and np.array_equal(np.random.rand(3), expected_draws[1])
    unet.disable_gradient_checkpointing()
    unet.requires_grad_(True)


def test_eval_with_ema_weights_swaps_back_bit_exact(parts, tmp_path):
    """run_eval(weights=ema.applied()) (what eval.use_ema does) renders with the EMA weights, then restores."""
    unet = parts.unet
    original = {n: p.detach().clone() for n, p in unet.named_parameters()}
    generator = torch.Generator().manual_seed(0)
    shadow = {n: p.detach() * 0.9 + 0.01 * torch.randn(p.shape, generator=generator)
              for n, p in unet.named_parameters()}
    ema = EMA({"unet": unet}, decay=0.5, update_every=1, start_step=0)
    ema.update(0)
    ema.shadow = {f"unet.{n}": v.clone() for n, v in shadow.items()}
    reference = SDXLParts(**{**parts.__dict__, "unet": copy.deepcopy(unet)})
    with torch.no_grad():
        for n, p in reference.unet.named_parameters():
            p.copy_(shadow[n])
    cfg = EvalConfig(backend="kdiffusion", num_inference_steps=2)
    plain = ev.run_eval(parts, cfg, [PROMPT], tmp_path / "plain")
    with_ema = ev.run_eval(parts, cfg, [PROMPT], tmp_path / "ema", weights=ema.applied())
    assert all(torch.equal(p, original[n]) for n, p in unet.named_parameters())  # bit-exact after the eval
    assert all(torch.equal(ema.shadow[f"unet.{n}"], v) for n, v in shadow.items())  # the EMA itself unchanged
    expected = ev.run_eval(reference, cfg, [PROMPT], tmp_path / "reference")
    assert np.array_equal(np.asarray(with_ema.grid), np.asarray(expected.grid))
    assert not np.array_equal(np.asarray(plain.grid), np.asarray(with_ema.grid))


def tensors_of(module: torch.nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


def test_parked_on_moves_and_puts_back_the_very_same_tensors():
    """Parked on another device inside (the meta device: the only other one a CPU machine has), and after it
    every parameter and buffer is the original tensor again: same storage, same values, same Parameter."""
    helpers = build_tiny_sdxl(0)
    modules = [helpers.vae, helpers.text_encoder]
    assert any(True for _ in helpers.text_encoder.buffers())  # position_ids: buffers are covered too
    before = [[(t, t.data_ptr(), t.detach().clone(), t.dtype, t.requires_grad) for t in tensors_of(m)]
              for m in modules]
    ids = helpers.tokenizer(["a red circle"], return_tensors="pt").input_ids
    expected = helpers.text_encoder(ids).last_hidden_state
    with ev.parked_on(modules, torch.device("meta")):
        assert all(t.device.type == "meta" for m in modules for t in tensors_of(m))
        assert helpers.text_encoder(ids).last_hidden_state.device.type == "meta"  # it computes there
    for module, saved in zip(modules, before, strict=True):
        after = tensors_of(module)
        assert len(after) == len(saved)
        for t, (old, ptr, values, dtype, grad) in zip(after, saved, strict=True):
            assert t is old  # the same Parameter/buffer object: optimizers and EMA keep valid references
            assert t.device.type == "cpu" and t.data_ptr() == ptr and torch.equal(t, values)
            assert t.dtype == dtype and t.requires_grad == grad
    assert torch.equal(helpers.text_encoder(ids).last_hidden_state, expected)


def test_run_eval_parks_vae_and_text_encoders_beside_the_unet_outside_inference_mode(tmp_path, monkeypatch):
    """The text-embedding cache leaves both text encoders on the CPU, the latent cache the VAE: run_eval brings
    all three to the UNet's device, outside torch.inference_mode, and training finds every module as it was."""
    parts = build_tiny_sdxl(0)
    parts.text_encoder.requires_grad_(True)
    calls = []
    real = ev.parked_on

    @contextlib.contextmanager
    def recorded(modules, device):
        calls.append(("enter", modules, device, torch.is_inference_mode_enabled()))
        with real(modules, device):
            yield
        calls.append(("exit", modules, device, torch.is_inference_mode_enabled()))

    monkeypatch.setattr(ev, "parked_on", recorded)
    modules = {n: getattr(parts, n) for n in ("unet", "vae", "text_encoder", "text_encoder_2")}
    before = {n: [(p, p.device, p.dtype, p.requires_grad) for p in m.parameters()] for n, m in modules.items()}
    ev.run_eval(parts, EvalConfig(backend="kdiffusion", num_inference_steps=2), [PROMPT], tmp_path / "e")
    helpers = [parts.vae, parts.text_encoder, parts.text_encoder_2]
    assert [(what, [id(m) for m in ms], device, inference) for what, ms, device, inference in calls] == [
        ("enter", [id(m) for m in helpers], parts.unet.device, False),
        ("exit", [id(m) for m in helpers], parts.unet.device, False)]
    for name, module in modules.items():
        after = [(p, p.device, p.dtype, p.requires_grad) for p in module.parameters()]
        assert len(after) == len(before[name]) and all(
            a[0] is b[0] and a[1:] == b[1:] for a, b in zip(after, before[name], strict=True)), name
        assert not any(t.is_inference() for t in tensors_of(module)), name  # still usable by autograd
    ids = parts.tokenizer(["a red circle"], return_tensors="pt").input_ids
    loss = parts.text_encoder(ids).last_hidden_state.square().mean()
    loss.backward()  # training goes on with the same modules
    assert all(p.grad is not None for p in parts.text_encoder.parameters() if p.requires_grad)


@pytest.mark.parametrize("entries,expected", [
    ("not json", "is not valid JSON (line 1"),
    ({"prompt": "x"}, "must hold a non-empty JSON list"),
    ([{"prompt": "ok"}, {"seed": 1}], "entry 1: \"prompt\" must be a non-empty string"),
    ([{"prompt": "ok", "resolution": "12x"}], "entry 0: \"resolution\" must look like \"1024x640\""),
    ([{"prompt": "ok"}, {"prompt": "b", "seed": -1}], "entry 1: \"seed\" must be an integer >= 0"),
    ([{"prompt": "ok", "height": 100}], "entry 0: \"height\" must be an integer >= 64 divisible by 8, got 100"),
    ([{"prompt": "ok", "cfg": 3}], "entry 0: unknown key(s) cfg"),
    (["just a string"], "entry 0: expected an object"),
])
def test_malformed_prompts_file_names_entry_and_problem(tmp_path, entries, expected):
    path = tmp_path / "p.json"
    path.write_text(entries if isinstance(entries, str) else json.dumps(entries))
    with pytest.raises(ConfigError) as err:
        ev.load_prompts(path, 1024, 1024)
    assert expected in str(err.value) and str(path) in str(err.value)


def test_prompts_overrides_and_example_file():
    prompts = ev.load_prompts(ROOT / "data" / "eval_prompts.example.json", 1024, 1024)
    assert [(p.width, p.height) for p in prompts] == [(1024, 1024), (1152, 896), (1152, 896), (832, 1216)]
    assert prompts[0].negative_prompt == "blurry" and prompts[1].negative_prompt == ""


def test_cli_rejects_malformed_prompts_at_start(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"prompt": "a"}, {"prompt": "b", "size": "wide"}]))
    proc = run_in_process(*tiny_overrides(tmp_path, ROOT / "data" / "images", steps=1, **{
        "eval.final.enabled": "true", "eval.prompts_path": str(bad)}))
    assert proc.returncode == 2
    assert "entry 1: \"size\" must look like \"1024x640\"" in proc.stderr
    assert "INFO device:" not in proc.stderr  # refused before the model loaded, so before any step
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- the seed's names

def closed_form_normal_sigmas(steps: int) -> list[float]:
    """ComfyUI's `normal` for SDXL where 999/(steps-1) is whole: σ_t = √((1-ᾱ_t)/ᾱ_t) at t = 999..0, then 0."""
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    alpha_bar = np.cumprod(1 - betas)
    timesteps = np.linspace(999, 0, steps).round().astype(int)
    return [float(np.sqrt((1 - alpha_bar[t]) / alpha_bar[t])) for t in timesteps] + [0.0]


SEED_STEPS = 4  # timesteps 999, 666, 333, 0: whole numbers, so `normal` has the closed form above
# (sampler_name, scheduler) as the seed writes them -> (diffusers class, settings, k-diffusion function, kwargs)
SEED_NAMES = {
    ("euler", "euler"): ("EulerDiscreteScheduler", {}, "sample_euler", {}),
    ("euler", "lms"): ("LMSDiscreteScheduler", {}, "sample_lms", {}),
    ("lms", "lms"): ("LMSDiscreteScheduler", {}, "sample_lms", {}),
    ("dpmpp_2m_sde_heun", "normal"): ("DPMSolverMultistepScheduler",
                                      {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun", "solver_order": 2},
                                      "sample_dpmpp_2m_sde", {"solver_type": "heun"}),
    ("euler", "beta"): ("EulerDiscreteScheduler", {}, "sample_euler", {}),
}


def expected_sigmas(scheduler: str) -> list[float]:
    if scheduler == "beta":  # beta's closed form is tested against ComfyUI in test_sampling.py
        return schedules.beta_scheduler(schedules.discrete_sigmas(), SEED_STEPS).tolist()
    return closed_form_normal_sigmas(SEED_STEPS)  # euler / lms: that sampler on the `normal` schedule


@pytest.mark.parametrize("sampler,scheduler", list(SEED_NAMES))
def test_seed_names_run_on_diffusers(parts, sampler, scheduler):
    cfg = load_config(ROOT / "config.json", [f"eval.sampler_name={sampler}", f"eval.scheduler={scheduler}"])
    assert cfg.eval.backend == "diffusers"  # valid as written, with the default backend
    class_name, settings, _, _ = SEED_NAMES[sampler, scheduler]
    cfg = EvalConfig(sampler_name=sampler, scheduler=scheduler, num_inference_steps=SEED_STEPS)
    sch, sigmas = eb.diffusers_scheduler(parts, cfg)
    assert isinstance(sch, getattr(diffusers, class_name))
    assert {k: sch.config[k] for k in settings} == settings
    assert not sch.config.use_karras_sigmas and not sch.config.use_beta_sigmas
    sch.set_timesteps(sigmas=sigmas)
    assert sch.sigmas.tolist() == pytest.approx(expected_sigmas(scheduler), rel=1e-6)
    image = finite_image(parts, cfg)
    assert image.shape == (64, 64, 3) and np.isfinite(image).all() and image.std() > 0.01


@pytest.mark.parametrize("sampler,scheduler", list(SEED_NAMES))
def test_seed_names_run_on_kdiffusion(parts, sampler, scheduler, monkeypatch):
    load_config(ROOT / "config.json", ["eval.backend=kdiffusion", f"eval.sampler_name={sampler}",
                                        f"eval.scheduler={scheduler}"])  # valid as written
    import k_diffusion.sampling as kd
    _, _, function_name, kwargs = SEED_NAMES[sampler, scheduler]
    real, calls = getattr(kd, function_name), []

    def recorded(model, x, sigmas, **options):  # the real k-diffusion sampler, with what it was given noted
        calls.append((sigmas.tolist(), options))
        return real(model, x, sigmas, **options)

    monkeypatch.setattr(kd, function_name, recorded)
    cfg = EvalConfig(backend="kdiffusion", sampler_name=sampler, scheduler=scheduler, num_inference_steps=SEED_STEPS)
    image = finite_image(parts, cfg)
    assert image.shape == (64, 64, 3) and np.isfinite(image).all() and image.std() > 0.01
    (sigmas, options), = calls
    expected = expected_sigmas(scheduler)
    if function_name == "sample_lms":  # its last step, to sigma 0, is the denoised sample (as ComfyUI's lms)
        expected = expected[:-1]
    assert sigmas == pytest.approx(expected, rel=1e-6)
    assert {k: options[k] for k in kwargs} == kwargs


@pytest.mark.parametrize("sampler,scheduler", [("euler", "euler"), ("euler", "lms"), ("dpmpp_2m", "normal")])
def test_deterministic_names_give_the_same_image_on_both_backends(parts, sampler, scheduler):
    """Same sigmas, same integer timesteps, same start noise: diffusers and k-diffusion agree to float rounding."""
    images = [finite_image(parts, EvalConfig(backend=backend, sampler_name=sampler, scheduler=scheduler,
                                             num_inference_steps=5)) for backend in ("diffusers", "kdiffusion")]
    assert np.abs(images[0] - images[1]).max() < 1e-4
    assert images[0].std() > 0.01


@pytest.mark.parametrize("overrides,expected", [
    (["eval.sampler_name=dpmpp_2m_sde_heun", "eval.scheduler=euler"],
     "eval.scheduler: 'euler' is the shortcut for sampler 'euler' on the 'normal' schedule, but eval.sampler_name "
     "is 'dpmpp_2m_sde_heun'; to run 'dpmpp_2m_sde_heun' set eval.scheduler to a schedule (normal, karras"),
    (["eval.backend=kdiffusion", "eval.sampler_name=heun", "eval.scheduler=lms"], "set eval.sampler_name to 'lms'"),
    (["eval.scheduler=lsm"], "nor a diffusers scheduler class (e.g. EulerDiscreteScheduler, "
                             "DPMSolverMultistepScheduler); did you mean 'lms'?"),
    (["eval.scheduler=EulerDiscreteSchedular"], "did you mean 'EulerDiscreteScheduler'?"),
    (["eval.backend=kdiffusion", "eval.scheduler=karas"], "valid: normal, karras, exponential, sgm_uniform, simple, "
                                                          "ddim_uniform, beta, linear_quadratic, kl_optimal, euler, "
                                                          "lms; did you mean 'karras'?"),
    (["eval.sampler_name=dpmpp_2m_sde_hune"], "did you mean 'dpmpp_2m_sde_heun'?"),
])
def test_seed_name_misuse_names_key_value_and_choices(overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["training.num_steps=1", "run.name=x", *overrides])
    assert expected in str(err.value)


def test_shortcut_is_logged_as_what_runs():
    expected = "sampler lms, scheduler normal (shortcut eval.scheduler=lms)"
    assert ev.describe_names(EvalConfig(scheduler="lms")) == expected
    assert ev.describe_names(EvalConfig(sampler_name="heun", scheduler="karras")) == "sampler heun, scheduler karras"


def test_cli_final_eval_with_the_seeds_lms_shortcut(tmp_path):
    """End to end: `eval.scheduler: "lms"` as the seed writes it, default backend, renders the final eval."""
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"prompt": "a red circle", "seed": 1, "height": 64, "width": 64}]))
    proc = run_in_process(*tiny_overrides(tmp_path, ROOT / "data" / "images", steps=1, **{
        "eval.final.enabled": "true", "eval.prompts_path": str(prompts), "eval.scheduler": "lms",
        "eval.num_inference_steps": "2"}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "backend diffusers, sampler lms, scheduler normal (shortcut eval.scheduler=lms)" in proc.stderr
    image = np.asarray(ev.Image.open(tmp_path / "out" / "test" / "eval" / "final" / "000_seed1.png"))
    assert image.shape == (64, 64, 3) and image.std() > 1
    grid = (tmp_path / "out" / "test" / "eval" / "final" / "grid.png").resolve()
    assert proc.stderr.strip().splitlines()[-1].endswith(f"look at the final eval images: {grid}")  # the last line


def test_eval_phase_renders_with_the_uncompiled_unet(monkeypatch, tmp_path, parts):
    """model.use_torch_compile: eval gets the plain UNet (no recompiles for the eval shapes, no compile wrapper)."""
    import types

    from accelerate import Accelerator

    from sdxl_ff.parallel.strategy import Parallelism
    from sdxl_ff.train import run

    seen = {}

    def fake_run_eval(eval_parts, *args, **kwargs):
        seen["unet"] = eval_parts.unet
        return types.SimpleNamespace(grid=None)

    monkeypatch.setattr(run, "run_eval", fake_run_eval)
    tracker = types.SimpleNamespace(log_eval=lambda *args: None)
    cfg = load_config(None, [f"training.output_dir={tmp_path}", "training.num_steps=1",
                             "model.train_text_encoder_1=false"])
    compiled = torch.compile(parts.unet, backend="eager")  # lazy: nothing compiles unless it is called
    accelerator = Accelerator(cpu=True)
    run.eval_phase(cfg, "final", SDXLParts(**{**parts.__dict__, "unet": compiled}), accelerator,
                   Parallelism.for_run(cfg, accelerator), [PROMPT], tracker, 1)
    assert seen["unet"] is parts.unet

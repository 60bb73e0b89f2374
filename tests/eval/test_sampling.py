"""Sigma tables and names in closed form (ComfyUI's own sequences: tests/eval/test_comfy_reference.py)."""

import math

import pytest
import torch

from sdxl_ff.config import sampler_names
from sdxl_ff.eval import schedules


def test_sdxl_table_closed_form():
    table = schedules.discrete_sigmas()
    assert float(table[0]) == pytest.approx(0.0292, abs=1e-4)  # ComfyUI's SDXL sigma_min
    assert float(table[-1]) == pytest.approx(14.6146, abs=1e-4)  # ... and sigma_max
    ztsnr = schedules.discrete_sigmas(zero_terminal_snr=True)
    assert float(ztsnr[-1]) == pytest.approx(math.sqrt((1 - 4.8973451890853435e-08) / 4.8973451890853435e-08),
                                             rel=1e-5)
    assert float(ztsnr[0]) == pytest.approx(float(table[0]), rel=1e-4)  # first timestep keeps its value


def test_beta_applies_to_timesteps_not_sigma():
    table = schedules.discrete_sigmas()
    out = schedules.beta_scheduler(table, 10)
    assert all(any(math.isclose(float(s), float(t), rel_tol=1e-7) for t in table) for s in out[:-1])


def test_timestep_round_trip_is_integer():
    table = schedules.discrete_sigmas()
    t = schedules.sigma_to_timestep(table[[0, 10, 999]], table)
    assert t.tolist() == [0, 10, 999] and t.dtype == torch.int64
    assert float(schedules.timestep_to_sigma(torch.tensor(10.0), table)) == pytest.approx(float(table[10]))


def test_initial_noise_scale():
    assert schedules.initial_noise_scale(14.6146, 14.6146) == pytest.approx(math.sqrt(1 + 14.6146 ** 2))
    assert schedules.initial_noise_scale(5.0, 14.6146) == 5.0


def test_scheduler_shortcuts_are_a_sampler_on_the_normal_schedule():
    assert sampler_names.resolve_shortcut("euler", "lms") == ("lms", "normal")
    assert sampler_names.resolve_shortcut("euler", "euler") == ("euler", "normal")
    assert sampler_names.resolve_shortcut("heun", "karras") == ("heun", "karras")
    assert sampler_names.resolve_shortcut("euler", "LMSDiscreteScheduler") == ("euler", "LMSDiscreteScheduler")
    for backend in ("diffusers", "kdiffusion"):  # the seed's names, as written, on both backends
        for scheduler in ("euler", "lms", "beta"):
            assert sampler_names.eval_name_errors(backend, "euler", scheduler) == [], (backend, scheduler)
        assert sampler_names.eval_name_errors(backend, "dpmpp_2m_sde_heun", "normal") == [], backend
        assert sampler_names.eval_name_errors(backend, "lms", "lms") == []
        assert sampler_names.eval_name_errors(backend, "dpmpp_2m", "lms")  # a shortcut picks its own sampler


def test_default_sampler_matches_the_config_default():
    from sdxl_ff.config.schema import EvalConfig
    assert EvalConfig().sampler_name == sampler_names.DEFAULT_SAMPLER


def test_diffusers_options_exist_on_the_classes_that_get_them():
    """A class outside CUSTOM_SIGMA_CLASSES gets karras/exponential as config options: it must have them."""
    import inspect
    for sampler, (name, _) in sampler_names.DIFFUSERS_SAMPLERS.items():
        params = inspect.signature(sampler_names.diffusers_scheduler_class(name).__init__).parameters
        for scheduler in schedules.SCHEDULER_NAMES:
            if sampler_names.eval_name_errors("diffusers", sampler, scheduler):
                continue
            class_name, options, custom = sampler_names.diffusers_route(sampler, scheduler)
            assert custom or set(options) <= set(params), (sampler, scheduler, class_name)

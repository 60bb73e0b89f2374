"""Write tests/data/comfy_sigmas.json: ComfyUI's sigma sequences for SDXL, computed independently with numpy.

Definitions follow ComfyUI's public source (comfy/model_sampling.py ModelSamplingDiscrete and
rescale_zero_terminal_snr_sigmas; comfy/samplers.py scheduler handlers and KSampler.calculate_sigmas;
comfy/k_diffusion/sampling.py get_sigmas_karras / get_sigmas_exponential), re-derived here in float64
numpy (float32 where ComfyUI stores float32) without torch, so sdxl_ff/sampling.py is checked against a
second implementation. Run: python tests/data/make_comfy_sigmas.py
"""

import json
import math
from pathlib import Path

import numpy as np
from scipy.stats import beta as beta_dist

STEPS = (1, 2, 3, 4, 7, 10, 20, 25, 30, 50)
SCHEDULERS = ("normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform", "beta",
              "linear_quadratic", "kl_optimal")


def table(ztsnr: bool) -> np.ndarray:
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    abar = np.cumprod(1 - betas)
    s = np.sqrt((1 - abar) / abar)
    if ztsnr:
        r = np.sqrt(1 / (s * s + 1))
        r = (r - r[-1]) * (r[0] / (r[0] - r[-1]))
        abar = r ** 2
        abar[-1] = 4.8973451890853435e-08
        s = np.sqrt((1 - abar) / abar)
    return s.astype(np.float32)


def sigma_at(t: float, s: np.ndarray) -> float:
    t = min(max(float(np.float32(t)), 0.0), len(s) - 1.0)
    lo, hi = math.floor(t), math.ceil(t)
    w = np.float32(t - lo)
    ls = np.log(s)
    return float(np.exp((1 - w) * ls[lo] + w * ls[hi]))


def normal(s, n, sgm=False):
    start, end = len(s) - 1, 0  # argmin over log distance of sigma_max / sigma_min
    if sgm:
        ts = np.linspace(start, end, n + 1, dtype=np.float32)[:-1]
        return [sigma_at(t, s) for t in ts] + [0.0]
    ts = np.linspace(start, end, n, dtype=np.float32)
    return [sigma_at(t, s) for t in ts] + [0.0]


def simple(s, n):
    return [float(s[len(s) - 1 - int(i * (len(s) / n))]) for i in range(n)] + [0.0]


def ddim_uniform(s, n):
    stride = max(len(s) // n, 1)
    return [float(s[i]) for i in range(1, len(s), stride)][::-1] + [0.0]


def beta(s, n):
    ts = np.rint(beta_dist.ppf(1 - np.linspace(0, 1, n, endpoint=False), 0.6, 0.6) * (len(s) - 1))
    keep = [t for i, t in enumerate(ts) if i == 0 or t != ts[i - 1]]
    return [float(s[int(t)]) for t in keep] + [0.0]


def karras(s, n, rho=7.0):
    lo, hi = float(s[0]) ** (1 / rho), float(s[-1]) ** (1 / rho)
    return list((hi + np.linspace(0, 1, n) * (lo - hi)) ** rho) + [0.0]


def exponential(s, n):
    return list(np.exp(np.linspace(math.log(float(s[-1])), math.log(float(s[0])), n))) + [0.0]


def linear_quadratic(s, n, thr=0.025):
    if n == 1:
        f = [1.0, 0.0]
    else:
        m = n // 2
        q = n - m
        d = m - thr * n
        a = d / (m * q ** 2)
        b = thr / m - 2 * d / q ** 2
        c = a * m ** 2
        f = [1 - x for x in [i * thr / m for i in range(m)] + [a * i * i + b * i + c for i in range(m, n)] + [1.0]]
    return [x * float(s[-1]) for x in f]


def kl_optimal(s, n):
    w = np.arange(n) / (n - 1) if n > 1 else np.full(1, np.nan)
    return list(np.tan(w * math.atan(float(s[0])) + (1 - w) * math.atan(float(s[-1])))) + [0.0]


def main() -> None:
    fns = dict(normal=normal, sgm_uniform=lambda s, n: normal(s, n, sgm=True), simple=simple,
               ddim_uniform=ddim_uniform, beta=beta, karras=karras, exponential=exponential,
               linear_quadratic=linear_quadratic, kl_optimal=kl_optimal)
    # ε and v-prediction share one sigma table; zero-terminal SNR (ComfyUI's "zsnr") changes it.
    out = {"steps": list(STEPS), "schedules": {}}
    for name, ztsnr in (("epsilon", False), ("v_prediction", False), ("v_prediction_ztsnr", True)):
        s = table(ztsnr)
        out["schedules"][name] = {
            "sigma_min": float(s[0]), "sigma_max": float(s[-1]),
            "sigmas": {sch: {str(n): [float(x) for x in fns[sch](s, n)] for n in STEPS
                             if not (sch == "kl_optimal" and n == 1)} for sch in SCHEDULERS},
            # KSampler for dpm_2 / dpm_2_ancestral / uni_pc: one step more, penultimate sigma dropped
            "discard_penultimate": {sch: {str(n): (lambda v: v[:-2] + v[-1:])([float(x) for x in fns[sch](s, n + 1)])
                                          for n in STEPS} for sch in SCHEDULERS},
        }
    Path(__file__).with_name("comfy_sigmas.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main()

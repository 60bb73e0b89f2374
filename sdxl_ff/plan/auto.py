"""model.memory_mode "auto": at start-up, the fastest rung of the planner's ladder that fits the card.

The rungs keep the effective batch (training.effective_batch_size, else batch_size x grad_accum_steps) and go
from the largest micro-batch down; for each micro-batch: plain, then model.full_bf16, training.fused_backward
(with one micro-batch per step only) and gradient checkpointing switched on one after another, the order of
`--plan`'s ladder (sdxl_ff/plan/report.py). A key written in the config or given with --set is never changed.
Without CUDA there is no card to fit: the first rung is taken, and the log says so.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time

import torch

from sdxl_ff.config.errors import ConfigError
from sdxl_ff.config.rules import buckets_fix_the_batch, cross_check, shards_model
from sdxl_ff.config.schema import Config
from sdxl_ff.plan import report
from sdxl_ff.plan.planner import GiB

log = logging.getLogger("sdxl_ff")

# the keys auto chooses, and the Rung field each one becomes
CHOSEN = {"training.batch_size": "batch", "training.grad_accum_steps": "accumulation",
          "model.full_bf16": "full_bf16", "training.fused_backward": "fused_backward",
          "model.use_gradient_checkpointing": "checkpointing"}
SWITCHES = ("full_bf16", "fused_backward", "checkpointing")  # switched on in this order: cheapest in speed first


@dataclasses.dataclass(frozen=True)
class Rung:
    """One setting auto can choose."""
    batch: int
    accumulation: int
    full_bf16: bool = False
    fused_backward: bool = False
    checkpointing: bool = False

    def describe(self) -> str:
        def on(flag: bool) -> str:
            return "on" if flag else "off"
        return (f"batch {self.batch} x accumulation {self.accumulation}, full_bf16 {on(self.full_bf16)}, "
                f"fused_backward {on(self.fused_backward)}, gradient checkpointing {on(self.checkpointing)}")


@dataclasses.dataclass
class Choice:
    """The rung taken, why, and the rungs planned on the way (with their need in bytes, margin included)."""
    rung: Rung
    reason: str
    fits: bool
    tried: list[tuple[Rung, int]]
    kept: list[str]  # the chosen keys the config wrote itself


def splits(cfg: Config) -> list[tuple[int, int]]:
    """(micro-batch, accumulation) pairs of the effective batch, the largest micro-batch first."""
    t = cfg.training
    batch, accum = cfg.is_explicit("training.batch_size"), cfg.is_explicit("training.grad_accum_steps")
    if buckets_fix_the_batch(cfg) or (batch and accum) or cfg.model.memory_mode != "auto":
        return [(t.batch_size, t.grad_accum_steps)]
    total = t.effective_batch_size or t.batch_size * t.grad_accum_steps
    if batch:
        return [(t.batch_size, total // t.batch_size)]
    if accum:
        return [(total // t.grad_accum_steps, t.grad_accum_steps)]
    return [(b, total // b) for b in range(total, 0, -1) if total % b == 0]


def rungs(cfg: Config, processes: int, on_cuda: bool) -> list[Rung]:
    """Every rung in speed order; the keys the config wrote keep their values in each."""
    m, t = cfg.model, cfg.training
    pinned = {field: getattr(m if key.startswith("model.") else t, key.split(".")[1])
              for key, field in CHOSEN.items() if cfg.is_explicit(key) and field in SWITCHES}
    out: list[Rung] = []
    for batch, accumulation in splits(cfg):
        if pinned.get("fused_backward") and accumulation > 1:
            continue  # fused_backward written as true: only one micro-batch per step
        allowed = {  # what config/rules.py and parallel/processes.py refuse, never proposed
            "full_bf16": m.use_bf16 and not shards_model(cfg),
            "fused_backward": (accumulation == 1 and t.max_grad_norm is None and processes == 1
                               and not shards_model(cfg) and (m.use_bf16 or not on_cuda)),
            "checkpointing": True}
        rung = Rung(batch, accumulation, **pinned)
        candidates = [rung]
        for switch in SWITCHES:
            if switch not in pinned and allowed[switch]:
                rung = dataclasses.replace(rung, **{switch: True})
                candidates.append(rung)
        out += [c for c in candidates if c not in out]
    return out


def with_rung(cfg: Config, rung: Rung) -> Config:
    """A copy of `cfg` with the rung's keys set."""
    out = copy.deepcopy(cfg)
    apply(out, rung)
    return out


def apply(cfg: Config, rung: Rung) -> None:
    m, t = cfg.model, cfg.training
    t.batch_size, t.grad_accum_steps = rung.batch, rung.accumulation
    m.full_bf16, t.fused_backward, m.use_gradient_checkpointing = rung.full_bf16, rung.fused_backward, \
        rung.checkpointing


def choose(cfg: Config, card_bytes: int | None, processes: int = 1, on_cuda: bool = True) -> Choice:
    """The fastest rung whose plan (margin included) fits `card_bytes`; the first rung without a card."""
    candidates = rungs(cfg, processes, on_cuda)
    kept = [key for key in CHOSEN if cfg.is_explicit(key)]
    if card_bytes is None:
        return Choice(candidates[0], "no CUDA card to fit, so the fastest rung", True, [], kept)
    configs = report.model_configs(cfg)
    tried = []
    for rung in candidates:
        changed = with_rung(cfg, rung)
        need = report.plan_settings(changed, configs, report.settings_of(changed), processes).required_bytes
        tried.append((rung, need))
        if need <= card_bytes:
            faster = "".join(f"; {r.describe()} needs {n / GiB:.1f} GiB" for r, n in tried[:-1])
            return Choice(rung, f"rung {len(tried)} of {len(candidates)}, the fastest that fits the "
                                f"{card_bytes / GiB:.1f} GiB card: needs {need / GiB:.1f} GiB with the planner's "
                                f"margin{faster}", True, tried, kept)
    return Choice(candidates[-1], f"no rung fits the {card_bytes / GiB:.1f} GiB card: the last of {len(candidates)} "
                                  f"(the least memory) needs {tried[-1][1] / GiB:.1f} GiB with the margin; it will "
                                  f"probably run out of memory. `--plan` lists further settings (the caches, "
                                  f"model.ema_on_cpu)", False, tried, kept)


def resolve_memory_mode(cfg: Config, device: torch.device, processes: int = 1) -> Choice | None:
    """memory_mode "auto": set the chosen keys in `cfg` before anything is built, and log the choice."""
    if cfg.model.memory_mode != "auto":
        return None
    started = time.perf_counter()
    on_cuda = device.type == "cuda"
    card = torch.cuda.get_device_properties(device).total_memory if on_cuda else None
    try:
        choice = choose(cfg, card, processes, on_cuda)
    except Exception as e:  # noqa: BLE001 (the plan is advice: a model it cannot read must not stop training)
        last = rungs(cfg, processes, on_cuda)[-1]
        choice = Choice(last, f"no memory plan ({type(e).__name__}: {e}), so the last rung (the least memory)",
                        False, [], [key for key in CHOSEN if cfg.is_explicit(key)])
    if not on_cuda:
        choice.reason = f"no CUDA device ({device.type}): no card to fit, so the fastest rung"
    apply(cfg, choice.rung)
    if errors := cross_check(cfg):  # rungs() proposes only what the rules allow: this would be a bug
        raise ConfigError("model.memory_mode auto chose a refused setting: " + "; ".join(errors))
    kept = f"; kept as written: {', '.join(choice.kept)}" if choice.kept else ""
    rung = choice.rung
    line = (f"memory_mode auto: {rung.describe()} (effective batch {rung.batch * rung.accumulation}): "
            f"{choice.reason}{kept} ({time.perf_counter() - started:.1f} s)")
    if choice.fits:
        log.info(line)
    else:
        log.warning(line)
    return choice


def plan_text(cfg: Config, gpu_gb: float | None, processes: int = 2) -> str:
    """`--plan`: under memory_mode "auto" first its choice for the card, then the plan of the chosen setting."""
    if cfg.model.memory_mode != "auto":
        return report.plan_text(cfg, gpu_gb, processes)
    report.check_gpu_gb(gpu_gb)
    each = processes if shards_model(cfg) else 1
    choice = choose(cfg, None if gpu_gb is None else int(gpu_gb * GiB), each)
    lines = [f"model.memory_mode auto chooses {choice.rung.describe()}: {choice.reason}"]
    lines += [f"  {r.describe():<92} needs {n / GiB:6.1f} GiB" for r, n in choice.tried]
    return "\n".join(lines) + "\n" + report.plan_text(with_rung(cfg, choice.rung), gpu_gb, processes)

"""The run: one owner for everything a training holds, built once, and what it does between optimizer steps.

`Run(...)` builds the optimizer over the trained modules (as the run's parallelism wraps them), the objective,
the EMA, the progress and the tracker, and continues a resumed state; nothing is set on it afterwards. After each
optimizer step (`train_step`, step.py) it logs, validates, renders eval images and saves (`after_step`); at the
end it saves, exports and evaluates (`finish`). `state_dict()` / `load_state_dict()` are the whole
trainer_state.pt.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler

from sdxl_ff.checkpoint.checkpointer import (
    FORMAT_VERSION,
    Checkpointer,
    StopRequest,
    check_compatible,
    restore,
    resume_command,
    run_fingerprint,
)
from sdxl_ff.checkpoint.model_folder import last_good_state
from sdxl_ff.checkpoint.progress import TrainProgress
from sdxl_ff.config.schema import Config
from sdxl_ff.data.batch_sampler import SameSizeBatchSampler
from sdxl_ff.eval.backends import EvalPrompt, empty_negative
from sdxl_ff.eval.evaluation import describe_names, run_eval
from sdxl_ff.eval.validation import Validator
from sdxl_ff.eval.validation import describe as describe_validation
from sdxl_ff.export.export_step import export_single_file
from sdxl_ff.model.parts import SDXLParts
from sdxl_ff.model.trainables import Trainables
from sdxl_ff.objective.diffusion import TimestepSampling
from sdxl_ff.objective.predict import LossWeighting, Shard, training_objective
from sdxl_ff.optim.ema import EMA, ema_for
from sdxl_ff.optim.optimizers import learning_rates
from sdxl_ff.parallel.strategy import Parallelism
from sdxl_ff.parallel.torch_compile import apply_torch_compile
from sdxl_ff.plan.report import MemoryCheck
from sdxl_ff.runtime.pause import pause_point
from sdxl_ff.train.display import StepBar, what_next
from sdxl_ff.train.divergence import DivergenceError, DivergenceWatch, checkpoint_before, divergence_message
from sdxl_ff.train.lr_plot import write_planned_curve
from sdxl_ff.train.lr_schedule import describe as describe_schedule
from sdxl_ff.train.lr_schedule import lr_factor
from sdxl_ff.train.stability import AnomalyWatch
from sdxl_ff.train.tracking import Tracker

log = logging.getLogger("sdxl_ff")


@dataclass
class StepResult:
    """What one optimizer step reports; `loss` is a device tensor unless a reduction already read it."""
    loss: torch.Tensor | float
    grad_norm: torch.Tensor | None
    stop: bool


class Run:
    """Everything one training run holds: the models, the optimizer, the data order, the progress."""
    cfg: Config
    accelerator: Accelerator
    parallel: Parallelism  # one process, DDP or FSDP2: wrapping, optimizer, EMA, saving (parallel/strategy.py)
    parts: SDXLParts
    trainables: Trainables
    trained_modules: list[torch.nn.Module]  # as the parallelism wrapped them
    optimizer: torch.optim.Optimizer
    scheduler: DDPMScheduler  # the training noise scheduler
    weighting: LossWeighting
    sampling: TimestepSampling  # how training timesteps are drawn
    sampler: SameSizeBatchSampler
    progress: TrainProgress
    total_steps: int
    first_step: int  # the step this process started (or resumed) at
    rates: dict[str, float | None]  # the configured base learning rate of each module
    fingerprint: dict
    tracker: Tracker
    checkpointer: Checkpointer
    ema: EMA | None
    prompts: list[EvalPrompt]  # eval.live / eval.final
    validator: Validator | None  # the deterministic validation loss, or None
    memory_check: MemoryCheck | None  # on CUDA: the planned peak next to the measured one
    held_bytes: dict[str, int] | None  # what this process held at the first step (measured when sharded)
    watches: dict[str, DivergenceWatch]  # the series watched for divergence (train/divergence.py)
    shard: Shard
    params: list[torch.nn.Parameter]  # the trained parameters, for clipping
    anomalies: AnomalyWatch  # training.detect_anomaly on one process (several: step_signals)
    bar: StepBar

    def __init__(self, cfg: Config, accelerator: Accelerator, parallel: Parallelism, parts: SDXLParts,
                 trainables: Trainables, sampler: SameSizeBatchSampler, seed: int, total_steps: int,
                 resume: dict | None = None, *, prompts: Sequence[EvalPrompt] = (), validator: Validator | None = None,
                 memory_check: MemoryCheck | None = None):
        """The optimizer over the trained modules, prepared for the devices and processes, and the run around it;
        continued from `resume` (a trainer state) when given."""
        t = cfg.training
        self.cfg, self.accelerator, self.parallel, self.parts, self.trainables = cfg, accelerator, parallel, parts, \
            trainables
        self.sampler, self.total_steps, self.rates = sampler, total_steps, learning_rates(cfg)
        self.prompts, self.validator, self.memory_check = list(prompts), validator, memory_check
        self.fingerprint = run_fingerprint({n: getattr(parts, n) for n in ("unet", "text_encoder", "text_encoder_2")},
                                           list(trainables.modules), parallel.optimizer_kind(),
                                           parallel.optimizer_impl())
        if resume:
            check_compatible(resume["fingerprint"], self.fingerprint, t.resume_state_path, t.resume_from)
        # the same on every process: replicas must round their (identical) weights identically
        rounding_generator = torch.Generator(accelerator.device).manual_seed(seed)
        self.trained_modules, self.optimizer, optimizer_name = parallel.wrap(trainables, rounding_generator)
        for name, module in zip(trainables.modules, self.trained_modules, strict=True):
            setattr(parts, name, module)
        if cfg.model.use_torch_compile:
            parts.unet = apply_torch_compile(parts.unet, cfg.model)  # whole, regional or off
        self.scheduler = parts.noise_scheduler()
        self.weighting, self.sampling = training_objective(t, self.scheduler.config.prediction_type)
        log.info("objective: %s prediction%s; loss weighting: %s; loss: %s; timesteps: %s",
                 self.scheduler.config.prediction_type, ", zero terminal SNR" if t.zero_terminal_snr else "",
                 self.weighting, self.weighting.loss_name, self.sampling)
        self.params = trainables.parameters()
        log.info("training %s (%.1f M parameters), optimizer: %s", ", ".join(trainables.modules),
                 sum(p.numel() for p in self.params) / 1e6, optimizer_name)
        warmup = cfg.model.ema_warmup
        self.ema = ema_for(cfg.model.use_ema and parallel.keeps_ema, trainables.modules, cfg.model.ema_decay,
                           t.ema_update_every, t.lr_warmup_steps, cfg.model.ema_on_cpu,
                           warmup=None if warmup is None else (warmup.inv_gamma, warmup.power))
        self.progress = TrainProgress(seed, torch.Generator().manual_seed(seed), rounding_generator)
        self.tracker = Tracker(cfg, accelerator.is_main_process, start_step=resume["global_step"] if resume else 0)
        self.checkpointer = Checkpointer(t.output_dir, t.keep_checkpoints)
        self.held_bytes = parallel.watch_held_bytes(self.optimizer, self.params)
        self.watches = {name: DivergenceWatch(name) for name in ("train/loss", "val/loss")}
        # Every process draws the randomness of the whole global batch and keeps its share (objective/predict.py),
        # so N processes see exactly the noise one process would.
        self.shard = Shard(accelerator.process_index, accelerator.num_processes)
        self.anomalies = AnomalyWatch(t.detect_anomaly and accelerator.num_processes == 1)
        self.describe()
        if resume:
            self.load_state_dict(resume)
        self.first_step = self.progress.global_step
        if accelerator.is_main_process:  # only the main process writes checkpoints
            self.checkpointer.remove_leftovers()
        self.bar = StepBar(total_steps, self.first_step, enabled=accelerator.is_main_process)

    def describe(self) -> None:
        """Log (and track) the schedule, the batch sizes and the evals of the run."""
        cfg, t, e = self.cfg, self.cfg.training, self.cfg.eval
        if self.accelerator.is_main_process:
            log.info("learning rate: %s; planned curve: %s", describe_schedule(t),
                     write_planned_curve(t, self.total_steps))
        effective_batch = self.sampler.batch_size * t.grad_accum_steps * self.accelerator.num_processes
        log.info("batch %d x accumulation %d = effective batch %d; %d optimizer steps", self.sampler.batch_size,
                 t.grad_accum_steps, effective_batch, self.total_steps)
        if self.prompts:
            log.info("eval: %d prompt(s), backend %s, %s, %d steps, cfg %g, empty negative prompt: %s",
                     len(self.prompts), e.backend, describe_names(e), e.num_inference_steps, e.cfg_scale,
                     empty_negative(e))
        self.tracker.log_run(cfg, effective_batch, len(self.sampler.sizes), dict(Counter(self.sampler.sizes)))

    def check_anomalies(self) -> None:
        """Raise AnomalyError if the last step watched had a NaN/Inf loss: called before anything is saved."""
        self.anomalies.check(lambda: last_good_state(self.cfg, self.checkpointer))

    @property
    def base_lrs(self) -> list[float]:
        return [self.rates[group["name"]] for group in self.optimizer.param_groups]

    # --------------------------------------------------------------------------- trainer_state.pt

    def state_dict(self, with_ema: bool = True) -> dict:
        """trainer_state.pt: progress, data position, optimizer, scaler, EMA and what the state fits.

        `with_ema=False` for the final save, which reads the EMA itself while it is swapped in.
        """
        p, t = self.progress, self.cfg.training
        scaler = self.accelerator.scaler
        state = {
            "format_version": FORMAT_VERSION, **p.state_dict(),
            "sampler": self.sampler.state_dict(p.epoch, p.batch_in_epoch),
            "optimizer": None, "scaler": scaler.state_dict() if scaler is not None else None,
            "model_id": self.cfg.model.id, "trained": list(self.trainables.modules), "fingerprint": self.fingerprint,
            "ema": None, "base_lrs": self.rates, "lr_factor": lr_factor(max(1, p.global_step), t, self.total_steps),
            "divergence": {name: watch.state_dict() for name, watch in self.watches.items()},
        }
        # the optimizer state and the EMA, whole here or in the checkpoint's shards (sharded: their counters here)
        state.update(self.parallel.held_state(self.optimizer, self.ema, with_ema))
        return state

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (read by the parallelism's resume_state, checked by check_compatible)."""
        self.parallel.load_held_state(self, state)  # the EMA (and, sharded, the optimizer state from the shards)
        restore(state, self.optimizer, self.accelerator, self.rates)
        if state["sampler"]:
            self.sampler.check_order(state["sampler"])
        for name, saved in state.get("divergence", {}).items():  # states before issue 28 have none: start afresh
            self.watches[name].load_state_dict(saved)
        self.progress.load_state_dict(state)  # last: it sets the global RNGs

    # --------------------------------------------------------------------------- between steps, and at the end

    def after_step(self, result: StepResult, stop: StopRequest) -> tuple[str, Path | None] | None:
        """Log, evaluate, checkpoint; (signal name, checkpoint) when the run stops here."""
        p, t, e = self.progress, self.cfg.training, self.cfg.eval
        step, last = p.global_step, p.global_step == self.total_steps
        p.add_loss(result.loss)
        self.bar.update(self.optimizer.param_groups[0]["lr"], p.epoch,
                        self.validator.postfix if self.validator else None)
        self.tracker.log_step(step, result.loss, self.optimizer, result.grad_norm, self.accelerator.scaler)
        if self.memory_check:
            self.memory_check.after_step(step - self.first_step, last, self.tracker.writer)
        if self.validator is not None and self.validator.due(step, self.total_steps):
            self.validate()
        if step % t.log_every == 0 or last:
            # the one read of the losses since the last log line (several processes: already read, the same on each)
            logged = p.recent_loss(t.log_every)
            if self.accelerator.is_main_process:
                self.bar.write(f"step {step}/{self.total_steps}  loss {logged:.4f}  epoch {p.epoch}")
                self.bar.show_loss(logged)
            self.tracker.flush()
            self.watch_divergence("train/loss", logged)
        pause_point(f"step-{step}")  # after the step, its log line and the lock taken; tests signal here
        if e.live.enabled and step % e.live.every_n_steps == 0:
            self.evaluate("live")
        # a stop asked for at the last step lets the run finish: its checkpoint would have nothing left to resume
        if result.stop and not last:
            return stop.signal_name or "SIGINT", self.save_checkpoint()
        if t.checkpoint_every and step % t.checkpoint_every == 0 and not last:
            self.save_checkpoint()
        return None

    def validate(self) -> None:
        """The deterministic validation loss (sdxl_ff/eval/validation.py), logged and shown."""
        step = self.progress.global_step
        values = self.validator.evaluate(step, self.parts, self.scheduler, self.weighting, self.accelerator,
                                         self.ema, self.tracker)
        if self.accelerator.is_main_process:
            self.bar.write(describe_validation(values, step))
        self.watch_divergence("val/loss", values["val/loss"])

    def watch_divergence(self, series: str, value: float) -> None:
        """Warn once (log and TensorBoard) when a logged series diverges; stop under training.stop_on_divergence."""
        step = self.progress.global_step
        found = self.watches[series].observe(step, value)
        if found is None:
            return
        stopping = self.cfg.training.stop_on_divergence
        checkpoint = checkpoint_before(self.checkpointer.existing(), found.last_good_step)
        lower = f"training.lr_unet={self.cfg.training.lr_unet / 2:g}"
        message = divergence_message(found, checkpoint, stopping,
                                     resume_command(self.cfg, checkpoint, lower) if checkpoint else None)
        self.tracker.log_text("divergence", message, step)
        if stopping:
            self.tracker.close()
            raise DivergenceError(message)
        if self.accelerator.is_main_process:
            log.warning("%s", message)

    def evaluate(self, phase: str) -> Path | None:
        """Render eval.<phase> ("live" or "final") with the EMA swapped in under eval.use_ema; the grid's path on
        the main process."""
        weights = self.ema.applied() if self.ema is not None and self.cfg.eval.use_ema else None
        return eval_phase(self.cfg, phase, self.parts, self.accelerator, self.parallel, self.prompts, self.tracker,
                          self.progress.global_step, weights=weights)

    def save_checkpoint(self) -> Path | None:
        """A numbered checkpoint (its path on the main process); how each process takes part is the parallelism's."""
        self.check_anomalies()  # never save the weights of a step whose loss was NaN/Inf
        return self.parallel.save_checkpoint(self)

    def finish(self, interrupted: tuple[str, Path | None] | None, elapsed: float) -> dict:
        """The final save, export and eval (or, when stopped, the command that resumes); the run's summary."""
        cfg, accelerator, p = self.cfg, self.accelerator, self.progress
        self.bar.close()
        self.check_anomalies()  # the last step's loss, before the final save
        summary = {"global_step": p.global_step, "losses": p.losses, "seconds": elapsed, "seed": p.seed,
                   "interrupted": None}
        if interrupted:
            self.tracker.close()
            signal_name, path = interrupted
            if accelerator.is_main_process:  # the path of the checkpoint is known there only
                log.warning("stopped by %s at step %d/%d; saved %s. Resume with:\n  %s", signal_name, p.global_step,
                            self.total_steps, path, resume_command(cfg, path))
            return {**summary, "interrupted": signal_name, "checkpoint": str(path)}
        self.parallel.save_final(self)
        if self.held_bytes is not None:
            summary["bytes_per_process"] = dict(self.held_bytes)
        accelerator.wait_for_everyone()
        if cfg.export.save_single_file and accelerator.is_main_process:
            export_single_file(cfg.export, cfg.training.output_dir)
        grid = self.evaluate("final") if cfg.eval.final.enabled else None
        self.tracker.close()
        done = p.global_step - self.first_step
        log.info("done: %d steps in %.1f s (%.3f s/step)", done, elapsed, elapsed / max(1, done))
        if accelerator.is_main_process:
            log.info("%s", what_next(cfg, grid))  # the grid, when there is one, is the last line a newcomer reads
        return summary


def eval_phase(cfg: Config, phase: str, parts: SDXLParts, accelerator: Accelerator, parallel: Parallelism,
               prompts: list[EvalPrompt], tracker: Tracker, global_step: int,
               weights: contextlib.AbstractContextManager | None = None) -> Path | None:
    """Render eval.<phase> (live or final) on the main process, log its grid and return its path (main process
    only); `weights` (a context manager) may swap EMA in."""
    grid = None
    with parallel.eval_parts(parts, weights) as (parts, weights):
        if accelerator.is_main_process:
            limit = getattr(cfg.eval, phase).max_batches
            chosen = prompts[:limit] if limit else prompts
            out_dir = Path(cfg.training.output_dir) / "eval" / phase
            out_dir = out_dir / f"step_{global_step}" if phase == "live" else out_dir
            unwrapped = {name: accelerator.unwrap_model(getattr(parts, name), keep_torch_compile=False)
                         for name in ("unet", "text_encoder", "text_encoder_2")}
            result = run_eval(SDXLParts(**{**parts.__dict__, **unwrapped}), cfg.eval, chosen, out_dir,
                              weights=weights, autocast=accelerator.autocast())
            summary = f"step {global_step}: {len(chosen)} image(s) in {out_dir}"
            tracker.log_eval(phase, global_step, result.grid, summary)
            log.info("eval/%s %s", phase, summary)
            grid = out_dir.resolve() / "grid.png"
    accelerator.wait_for_everyone()
    return grid

"""Full fine-tuning of Stable Diffusion XL, driven by one JSON config.

    python train_sdxl_ff.py [--config config.json] [--set training.num_steps=100 ...]
    accelerate launch train_sdxl_ff.py --config config.json

The loop below reads like the algorithm: get batch, forward, loss, backward, step, log, save.
Everything else lives in named functions in `sdxl_ff/` and `dataset.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path

from sdxl_ff.config.errors import ConfigError, UserError
from sdxl_ff.config.load import add_config_arguments, load_config, to_dict
from sdxl_ff.config.rules import scheduler_timestep_errors
from sdxl_ff.config.schema import Config
from sdxl_ff.runtime.console import quiet_libraries, quiet_loggers

log = logging.getLogger("sdxl_ff")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Full fine-tuning of SDXL from one JSON config.")
    add_config_arguments(parser)
    parser.add_argument("--cache-only", action="store_true",
                        help="build the enabled latent / text-embedding caches, then exit without training")
    parser.add_argument("--overwrite", action="store_true",
                        help="start a fresh run even if training.output_dir holds an earlier one (its model is "
                             "replaced when this run finishes)")
    parser.add_argument("--plan", action="store_true",
                        help="print the predicted peak GPU memory of one step (model configs only, no weights), "
                             "whether it fits and what would make it fit; then exit")
    parser.add_argument("--gpu-memory", type=float, metavar="GB",
                        help="with --plan: the card's memory in GiB (default: the detected CUDA device)")
    parser.add_argument("--processes", type=int, metavar="N",
                        help="with --plan and training.sharding fsdp2: the processes the model is sharded over "
                             "(default: those of accelerate launch / torchrun, else 2)")
    parser.add_argument("--save-tiny-model", metavar="DIR",
                        help="write the built-in tiny SDXL (builtin:tiny-sdxl) as a Diffusers folder and exit")
    return parser.parse_args(argv)


def setup_logging(main_process: bool) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger().setLevel(logging.INFO if main_process else logging.WARNING)
    quiet_loggers()  # imports nothing: a config mistake is still reported before the heavy imports


def check_plan_arguments(args: argparse.Namespace) -> None:
    """--gpu-memory and --processes describe the card and the processes of a plan: without --plan nothing reads
    them (a training run uses the card and processes it runs on), so they are refused rather than ignored."""
    for flag, value in (("--gpu-memory", args.gpu_memory), ("--processes", args.processes)):
        if value is not None and not args.plan:
            raise ConfigError(f"{flag} {value:g} is only read by --plan (a training run uses the card and processes it "
                              f"runs on); add --plan, or remove {flag}")


def read_command_line(argv: list[str] | None) -> tuple[argparse.Namespace, Config | None]:
    """The arguments and the checked config (None with --save-tiny-model); raises ConfigError. Imports no torch."""
    args = parse_args(argv)
    check_plan_arguments(args)
    setup_logging(main_process=True)
    return args, None if args.save_tiny_model else load_config(args.config, args.overrides)


if __name__ == "__main__":  # a config mistake is reported at once, before the imports below (seconds) are paid
    try:
        COMMAND_LINE = read_command_line(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)

# bitsandbytes warns at import that an optional CPU kernel package is missing; it is not needed here.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

import torch  # noqa: E402
from torch.utils.data import DataLoader

from sdxl_ff.checkpoint.checkpointer import (
    Checkpointer,
    StopRequest,
    check_compatible,
    load_resume_state,
    resume_command,
    run_fingerprint,
)
from sdxl_ff.checkpoint.lock import run_lock
from sdxl_ff.checkpoint.model_folder import (
    check_fresh_output,
    check_output_folders,
    check_room_for_final_save,
    interrupted_hint,
    save_final,
    write_model_folder,
)
from sdxl_ff.checkpoint.progress import TrainProgress
from sdxl_ff.data import dataset as data_lib
from sdxl_ff.data.caches import check_cache_only, prepare_caches
from sdxl_ff.eval.backends import EvalPrompt, check_diffusers_backend, empty_negative
from sdxl_ff.eval.evaluation import describe_names, load_prompts, run_eval
from sdxl_ff.eval.validation import describe as describe_validation
from sdxl_ff.eval.validation import make_validator, validation_set
from sdxl_ff.export.export_step import ExportInterrupted, check_export, export_single_file
from sdxl_ff.model import parts as models
from sdxl_ff.model.attention import configure_attention
from sdxl_ff.model.trainables import configure_modules
from sdxl_ff.objective.predict import training_objective
from sdxl_ff.optim.ema import ema_for
from sdxl_ff.optim.optimizers import build_optimizer, learning_rates, optimizer_impl, optimizer_kind
from sdxl_ff.parallel.accelerator import compile_unet, make_accelerator
from sdxl_ff.parallel.fsdp2 import shard_trained, watch_held_bytes
from sdxl_ff.parallel.fsdp2_state import eval_parts, save_final_sharded, save_sharded_checkpoint
from sdxl_ff.parallel.processes import describe_processes, prepare, shared_seed
from sdxl_ff.plan.report import MemoryCheck, detected_gpu_gib, plan_text
from sdxl_ff.runtime.gpu_settings import apply_speed_settings
from sdxl_ff.runtime.pause import pause_point
from sdxl_ff.runtime.rng import seed_everything
from sdxl_ff.runtime.wsl import pin_memory_for
from sdxl_ff.train.divergence import DivergenceError, checkpoint_before, divergence_message
from sdxl_ff.train.lr_plot import write_planned_curve
from sdxl_ff.train.lr_schedule import describe
from sdxl_ff.train.run import Run, StepBar, StepResult, train_step, what_next
from sdxl_ff.train.tracking import Tracker


def eval_phase(cfg: Config, phase: str, parts: models.SDXLParts, accelerator, prompts: list[EvalPrompt],
               tracker: Tracker, global_step: int, weights=None) -> Path | None:
    """Render eval.<phase> (live or final) on the main process, log its grid and return its path (main process
    only); `weights` may swap EMA in."""
    sharded = cfg.training.sharding == "fsdp2"  # every process gathers its shards (the EMA's if swapped in) once
    grid = None
    with eval_parts(parts, accelerator, weights) if sharded else contextlib.nullcontext(parts) as parts:
        if sharded:
            weights = None
        if accelerator.is_main_process:
            limit = getattr(cfg.eval, phase).max_batches
            chosen = prompts[:limit] if limit else prompts
            out_dir = Path(cfg.training.output_dir) / "eval" / phase
            out_dir = out_dir / f"step_{global_step}" if phase == "live" else out_dir
            unwrapped = {name: accelerator.unwrap_model(getattr(parts, name), keep_torch_compile=False)
                         for name in ("unet", "text_encoder", "text_encoder_2")}
            result = run_eval(models.SDXLParts(**{**parts.__dict__, **unwrapped}), cfg.eval, chosen, out_dir,
                              weights=weights, autocast=accelerator.autocast())
            summary = f"step {global_step}: {len(chosen)} image(s) in {out_dir}"
            tracker.log_eval(phase, global_step, result.grid, summary)
            log.info("eval/%s %s", phase, summary)
            grid = out_dir.resolve() / "grid.png"
    accelerator.wait_for_everyone()
    return grid


def endless_batches(loader: DataLoader, sampler: data_lib.SameSizeBatchSampler, epoch: int, start: int):
    """Yield (epoch, index_in_epoch, batch) forever, resuming at (epoch, start)."""
    while True:
        sampler.epoch, sampler.start = epoch, start
        for index, batch in enumerate(loader, start=start):
            yield epoch, index, batch
        epoch, start = epoch + 1, 0


def total_optimizer_steps(cfg: Config, batches_per_epoch: int) -> int:
    """The stop condition in optimizer steps: num_steps, num_epochs, or whichever comes first."""
    t = cfg.training
    candidates = []
    if t.num_steps is not None:
        candidates.append(t.num_steps)
    if t.num_epochs is not None:
        candidates.append(max(1, math.ceil(t.num_epochs * batches_per_epoch / t.grad_accum_steps)))
    return min(candidates)


def check_steps_left(cfg: Config, saved_step: int, total_steps: int) -> None:
    """Refuse, before any model loads, a resume whose state already reached the stop condition (0 steps left)."""
    if saved_step < total_steps:
        return
    t = cfg.training
    keys = [f"training.num_steps is {t.num_steps}"] if t.num_steps is not None else []
    if t.num_epochs is not None:
        keys.append(f"training.num_epochs is {t.num_epochs} ({total_steps} optimizer steps)")
    remedy = f"raise training.num_steps above {saved_step} (e.g. --set training.num_steps={saved_step + total_steps})"
    if t.num_epochs is not None:
        remedy += " or raise training.num_epochs"
    raise ConfigError(f"{' and '.join(keys)}, but the resumed state {t.resume_state_path} is already at step "
                      f"{saved_step}: nothing is left to train. num_steps/num_epochs count the whole run including "
                      f"the resumed steps; {remedy} to train further")


def build_run(cfg: Config, accelerator, parts: models.SDXLParts, trainables, sampler, seed: int, total_steps: int,
              resume: dict | None) -> Run:
    """The optimizer over the trained modules, prepared for the devices and processes; the run around it."""
    t = cfg.training
    fingerprint = run_fingerprint({n: getattr(parts, n) for n in ("unet", "text_encoder", "text_encoder_2")},
                                  list(trainables.modules), optimizer_kind(cfg), optimizer_impl(cfg))
    if resume:
        check_compatible(resume["fingerprint"], fingerprint, t.resume_state_path, t.resume_from)
    if t.sharding == "fsdp2":  # before the optimizer is built: it steps each process's shards
        shard_trained(trainables.modules, accelerator, cfg.optimizer.type)
    # the same on every process: replicas must round their (identical) weights identically
    rounding_generator = torch.Generator(accelerator.device).manual_seed(seed)
    optimizer, optimizer_name = build_optimizer(cfg, trainables, rounding_generator)
    trained_modules, optimizer = prepare(accelerator, trainables, optimizer)
    for name, module in zip(trainables.modules, trained_modules, strict=True):
        setattr(parts, name, module)
    if cfg.model.use_torch_compile:
        parts.unet = compile_unet(parts.unet, cfg.model.torch_compile_kwargs)
    scheduler = parts.noise_scheduler()
    weighting, sampling = training_objective(t, scheduler.config.prediction_type)
    log.info("objective: %s prediction%s; loss weighting: %s; loss: %s; timesteps: %s",
             scheduler.config.prediction_type, ", zero terminal SNR" if t.zero_terminal_snr else "", weighting,
             weighting.loss_name, sampling)
    n_params = sum(p.numel() for p in trainables.parameters())
    log.info("training %s (%.1f M parameters), optimizer: %s", ", ".join(trainables.modules), n_params / 1e6,
             optimizer_name)
    # only the main process saves and evaluates the EMA: the others would keep a copy of the weights for nothing;
    # sharded, each process keeps the EMA of its own shards
    warmup = cfg.model.ema_warmup
    keeps_ema = cfg.model.use_ema and (accelerator.is_main_process or t.sharding == "fsdp2")
    ema = ema_for(keeps_ema, trainables.modules, cfg.model.ema_decay,
                  t.ema_update_every, t.lr_warmup_steps, cfg.model.ema_on_cpu,
                  warmup=None if warmup is None else (warmup.inv_gamma, warmup.power))
    progress = TrainProgress(seed, torch.Generator().manual_seed(seed), rounding_generator)
    tracker = Tracker(cfg, accelerator.is_main_process, start_step=resume["global_step"] if resume else 0)
    run = Run(cfg, accelerator, parts, trainables, trained_modules, optimizer, scheduler, weighting, sampler,
              progress, total_steps, learning_rates(cfg), fingerprint, tracker,
              Checkpointer(t.output_dir, t.keep_checkpoints), ema, sampling=sampling)
    if run.sharded:
        run.held_bytes = watch_held_bytes(optimizer, run.params)
    return run


def describe_plan(run: Run, train_set, prompts: list[EvalPrompt]) -> None:
    """Log (and track) the schedule, the batch sizes and the evals of the run."""
    cfg, accelerator, t, e = run.cfg, run.accelerator, run.cfg.training, run.cfg.eval
    if accelerator.is_main_process:
        log.info("learning rate: %s; planned curve: %s", describe(t), write_planned_curve(t, run.total_steps))
    effective_batch = run.sampler.batch_size * t.grad_accum_steps * accelerator.num_processes
    log.info("batch %d x accumulation %d = effective batch %d; %d optimizer steps", run.sampler.batch_size,
             t.grad_accum_steps, effective_batch, run.total_steps)
    if prompts:
        log.info("eval: %d prompt(s), backend %s, %s, %d steps, cfg %g, empty negative prompt: %s", len(prompts),
                 e.backend, describe_names(e), e.num_inference_steps, e.cfg_scale, empty_negative(e))
    run.tracker.log_run(cfg, effective_batch, len(train_set), dict(Counter(train_set.sizes)))


def save_checkpoint(run: Run) -> Path | None:
    """A numbered checkpoint (main process); the others wait for it (or, sharded, write their shards)."""
    run.check_anomalies()  # never save the weights of a step whose loss was NaN/Inf
    if run.sharded:
        return save_sharded_checkpoint(run)
    path = None
    if run.accelerator.is_main_process:
        path = run.checkpointer.save(run.progress.global_step, lambda tmp: write_model_folder(
            tmp, run.cfg, run.parts, run.trainables, run.accelerator, run.state_dict()))
        log.info("checkpoint: %s", path)
    run.accelerator.wait_for_everyone()
    return path


def after_step(run: Run, result: StepResult, stop: StopRequest, bar: StepBar,
               prompts: list[EvalPrompt]) -> tuple[str, Path | None] | None:
    """Log, evaluate, checkpoint; (signal name, checkpoint) when the run stops here."""
    cfg, p, t, e = run.cfg, run.progress, run.cfg.training, run.cfg.eval
    step, last = p.global_step, p.global_step == run.total_steps
    p.add_loss(result.loss)
    bar.update(run.optimizer.param_groups[0]["lr"], p.epoch, run.validator.postfix if run.validator else None)
    run.tracker.log_step(step, result.loss, run.optimizer, result.grad_norm, run.accelerator.scaler)
    if run.memory_check:
        run.memory_check.after_step(step - run.first_step, last, run.tracker.writer)
    if run.validator is not None and run.validator.due(step, run.total_steps):
        validate(run, bar)
    if step % t.log_every == 0 or last:
        # the one read of the losses since the last log line (several processes: already read, the same on each)
        logged = p.recent_loss(t.log_every)
        if run.accelerator.is_main_process:
            bar.write(f"step {step}/{run.total_steps}  loss {logged:.4f}  epoch {p.epoch}")
            bar.show_loss(logged)
        run.tracker.flush()
        watch_divergence(run, "train/loss", logged)
    pause_point(f"step-{step}")  # after the step, its log line and the lock taken; tests signal here
    if e.live.enabled and step % e.live.every_n_steps == 0:
        eval_phase(cfg, "live", run.parts, run.accelerator, prompts, run.tracker, step, weights=eval_weights(run))
    # a stop asked for at the last step lets the run finish: its checkpoint would have nothing left to resume
    if result.stop and not last:
        return stop.signal_name or "SIGINT", save_checkpoint(run)
    if t.checkpoint_every and step % t.checkpoint_every == 0 and not last:
        save_checkpoint(run)
    return None


def validate(run: Run, bar: StepBar) -> None:
    """The deterministic validation loss (sdxl_ff/eval/validation.py), logged and shown."""
    step = run.progress.global_step
    values = run.validator.evaluate(step, run.parts, run.scheduler, run.weighting, run.accelerator, run.ema,
                                    run.tracker)
    if run.accelerator.is_main_process:
        bar.write(describe_validation(values, step))
    watch_divergence(run, "val/loss", values["val/loss"])


def watch_divergence(run: Run, series: str, value: float) -> None:
    """Warn once (log and TensorBoard) when a logged series diverges; stop under training.stop_on_divergence."""
    step = run.progress.global_step
    found = run.watches[series].observe(step, value)
    if found is None:
        return
    stopping = run.cfg.training.stop_on_divergence
    checkpoint = checkpoint_before(run.checkpointer.existing(), found.last_good_step)
    lower = f"training.lr_unet={run.cfg.training.lr_unet / 2:g}"
    message = divergence_message(found, checkpoint, stopping,
                                 resume_command(run.cfg, checkpoint, lower) if checkpoint else None)
    run.tracker.log_text("divergence", message, step)
    if stopping:
        run.tracker.close()
        raise DivergenceError(message)
    if run.accelerator.is_main_process:
        log.warning("%s", message)


def eval_weights(run: Run):
    """The EMA weights swapped in for sampling (eval.use_ema), or None for the trained weights."""
    return run.ema.applied() if run.ema is not None and run.cfg.eval.use_ema else None


def finish(run: Run, prompts: list[EvalPrompt], interrupted: tuple[str, Path | None] | None, first_step: int,
           elapsed: float) -> dict:
    """The final save, export and eval (or, when stopped, the command that resumes); the run's summary."""
    cfg, accelerator, p = run.cfg, run.accelerator, run.progress
    run.check_anomalies()  # the last step's loss, before the final save
    summary = {"global_step": p.global_step, "losses": p.losses, "seconds": elapsed, "seed": p.seed,
               "interrupted": None}
    if interrupted:
        run.tracker.close()
        signal_name, path = interrupted
        if accelerator.is_main_process:  # the path of the checkpoint is known there only
            log.warning("stopped by %s at step %d/%d; saved %s. Resume with:\n  %s", signal_name, p.global_step,
                        run.total_steps, path, resume_command(cfg, path))
        return {**summary, "interrupted": signal_name, "checkpoint": str(path)}
    if run.sharded:
        save_final_sharded(run)
        summary["bytes_per_process"] = dict(run.held_bytes)
    elif accelerator.is_main_process:
        save_final(cfg, run.parts, run.trainables, accelerator, run.state_dict(with_ema=False), run.ema)
    accelerator.wait_for_everyone()
    if cfg.export.save_single_file and accelerator.is_main_process:
        export_single_file(cfg.export, cfg.training.output_dir)
    grid = None
    if cfg.eval.final.enabled:
        grid = eval_phase(cfg, "final", run.parts, accelerator, prompts, run.tracker, p.global_step,
                          weights=eval_weights(run))
    run.tracker.close()
    done = p.global_step - first_step
    log.info("done: %d steps in %.1f s (%.3f s/step)", done, elapsed, elapsed / max(1, done))
    if accelerator.is_main_process:
        log.info("%s", what_next(cfg, grid))  # the grid, when there is one, is the last line a newcomer reads
    return summary


def train(cfg: Config, cache_only: bool = False, overwrite: bool = False) -> dict:
    """Run one training (or only build the caches); return a summary (steps, losses, how it ended)."""
    if cache_only:
        check_cache_only(cfg)
    accelerator = make_accelerator(cfg)
    setup_logging(accelerator.is_main_process)
    quiet_libraries()  # transformers' per-save and per-load progress bars too
    describe_processes(accelerator)
    log.info("config %s resolved (saved with every output as sdxl_ff_config.json):\n%s", cfg.source,
             "\n".join(f"  {key}: {json.dumps(value)}" for key, value in to_dict(cfg).items()))
    t, e = cfg.training, cfg.eval
    check_export(cfg)
    check_output_folders(cfg, accelerator)
    if not t.resume_from and not cache_only:
        check_fresh_output(cfg, overwrite)
    resume = load_resume_state(cfg, accelerator)
    seed = resume["seed"] if resume else shared_seed(cfg, accelerator)
    if resume:
        log.info("resume: from %s at step %d (seed %d from the state)", t.resume_from, resume["global_step"], seed)
    prompts = load_prompts(e.prompts_path, e.height, e.width) if e.live.enabled or e.final.enabled else []
    seed_everything(seed)
    train_set, sampler = data_lib.build_data(cfg, seed, accelerator.num_processes, accelerator.process_index)
    total_steps = total_optimizer_steps(cfg, len(sampler))
    if resume:
        check_steps_left(cfg, resume["global_step"], total_steps)

    memory_check = MemoryCheck.start(cfg, accelerator.device, accelerator.is_main_process)  # CUDA: plan vs card
    parts = models.load_configured_model(cfg, t.resume_from)
    if timestep_errors := scheduler_timestep_errors(cfg, parts.scheduler.config.num_train_timesteps):
        raise ConfigError("; ".join(timestep_errors))  # a model whose scheduler load_config could not read
    if accelerator.is_main_process and not cache_only:
        check_room_for_final_save(cfg, parts)
    if prompts:  # the loaded model may have zero terminal SNR from its own scheduler config
        check_diffusers_backend(e, parts.scheduler.config)
    trainables = configure_modules(parts, cfg, accelerator)
    val_set = validation_set(cfg, train_set)
    prepare_caches(cfg, parts, train_set, accelerator, also=(val_set,) if val_set else ())
    if cache_only:
        log.info("--cache-only: caches are complete; not training")
        return {"global_step": 0, "losses": [], "seconds": 0.0, "seed": seed, "interrupted": None}
    loader = data_lib.make_loader(cfg, train_set, sampler,
                                  pin_memory=pin_memory_for(accelerator.device.type, cfg.data.num_workers))
    precision = {"no": "fp32", "fp16": "fp16 autocast + GradScaler", "bf16": "bf16 autocast"}
    log.info("device: %s, precision: %s; %s", accelerator.device, precision[accelerator.mixed_precision],
             configure_attention(parts.unet, accelerator.device))
    m = cfg.model
    log.info("%s", apply_speed_settings(parts.unet, accelerator.device, allow_tf32=m.allow_tf32,
                                        channels_last=m.channels_last, cudnn_benchmark=m.cudnn_benchmark,
                                        distinct_shapes=len(set(train_set.sizes))))
    run = build_run(cfg, accelerator, parts, trainables, sampler, seed, total_steps, resume)
    describe_plan(run, train_set, prompts)
    if resume:
        run.load_state_dict(resume)
    run.memory_check, run.first_step = memory_check, run.progress.global_step
    run.validator = make_validator(cfg, val_set)
    del resume  # its optimizer state and EMA (gigabytes for SDXL) now live in the optimizer and the EMA
    if accelerator.is_main_process:  # only the main process writes checkpoints
        run.checkpointer.remove_leftovers()

    p = run.progress
    batches = endless_batches(loader, sampler, epoch=p.epoch, start=p.batch_in_epoch)
    bar = StepBar(total_steps, p.global_step, enabled=accelerator.is_main_process)
    started, first_step, interrupted = time.time(), p.global_step, None
    if run.validator is not None and p.global_step == 0:
        validate(run, bar)  # the curve's starting point: the weights as loaded
    with StopRequest() as stop:
        while p.global_step < total_steps and not interrupted:
            result = train_step(run, batches, stop)
            interrupted = after_step(run, result, stop, bar, prompts)
    bar.close()
    return finish(run, prompts, interrupted, first_step, time.time() - started)


def main(argv: list[str] | None = None,
         command_line: tuple[argparse.Namespace, Config | None] | None = None) -> int:
    """The CLI; `command_line` is what read_command_line already returned for `argv`."""
    cfg = None
    try:
        args, cfg = command_line or read_command_line(argv)
        if args.save_tiny_model:
            quiet_libraries()  # transformers' "Writing model shards" bar for each text encoder
            models.save_pipeline(models.build_tiny_sdxl(), args.save_tiny_model)
            log.info("wrote the tiny SDXL to %s", args.save_tiny_model)
            return 0
        if args.plan:
            processes = args.processes or int(os.environ.get("WORLD_SIZE", 2))
            print(plan_text(cfg, args.gpu_memory if args.gpu_memory is not None else detected_gpu_gib(), processes))
            return 0
        with run_lock(cfg, enabled=not args.cache_only):  # one run per output folder, for the whole run
            result = train(cfg, cache_only=args.cache_only, overwrite=args.overwrite)
    except ExportInterrupted as e:  # the model is saved; only the single file is missing
        print(f"\nerror: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # outside the loop's own handling: loading, cache building, a second Ctrl-C
        print(f"\nerror: interrupted (Ctrl-C){interrupted_hint(cfg) if cfg else ''}", file=sys.stderr)
        return 130
    except UserError as e:  # a config key, a file, the disk: the message says what to do
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    if result["interrupted"]:
        return 128 + signal.Signals[result["interrupted"]].value
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main(command_line=COMMAND_LINE))

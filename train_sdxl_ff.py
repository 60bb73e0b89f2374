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

# bitsandbytes warns at import that an optional CPU kernel package is missing; it is not needed here.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

import torch  # noqa: E402
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import dataset as data_lib
from sdxl_ff import models
from sdxl_ff.attention import configure_attention
from sdxl_ff.caches import check_cache_only, prepare_caches
from sdxl_ff.checkpoint import (
    Checkpointer,
    ResumeError,
    SaveError,
    StopRequest,
    check_compatible,
    load_resume_state,
    restore,
    resume_command,
    run_fingerprint,
)
from sdxl_ff.config import Config, ConfigError, add_config_arguments, load_config, to_dict
from sdxl_ff.ema import ema_for
from sdxl_ff.evaluation import (
    EvalPrompt,
    check_diffusers_backend,
    describe_names,
    empty_negative,
    load_prompts,
    run_eval,
)
from sdxl_ff.export_step import ExportFailed, check_export, export_single_file
from sdxl_ff.lr_plot import write_planned_curve
from sdxl_ff.outputs import (
    check_fresh_output,
    check_output_folders,
    interrupted_hint,
    last_good_state,
    save_final,
    write_model_folder,
)
from sdxl_ff.runtime import (
    build_optimizer,
    compile_unet,
    configure_modules,
    describe_processes,
    learning_rates,
    make_accelerator,
    mean_over_processes,
    optimizer_kind,
    prepare,
    shared_seed,
    stop_agreed,
)
from sdxl_ff.schedule import describe, lr_factor, set_learning_rates
from sdxl_ff.stability import AnomalyError, anomaly_message, clip_gradients, loss_is_finite_everywhere
from sdxl_ff.state import (
    rng_state,
    seed_everything,
    set_rng_state,
)
from sdxl_ff.step import LossWeighting, Shard, predict, weighted_loss
from sdxl_ff.tracking import Tracker

log = logging.getLogger("sdxl_ff")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Full fine-tuning of SDXL from one JSON config.")
    add_config_arguments(parser)
    parser.add_argument("--cache-only", action="store_true",
                        help="build the enabled latent / text-embedding caches, then exit without training")
    parser.add_argument("--overwrite", action="store_true",
                        help="start a fresh run even if training.output_dir holds an earlier one (its model is "
                             "replaced when this run finishes)")
    parser.add_argument("--save-tiny-model", metavar="DIR",
                        help=f"write the built-in tiny SDXL ({models.TINY_ID}) as a Diffusers folder and exit")
    return parser.parse_args(argv)


def setup_logging(main_process: bool) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger().setLevel(logging.INFO if main_process else logging.WARNING)
    for noisy in ("diffusers", "transformers", "accelerate", "bitsandbytes"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def eval_phase(cfg: Config, phase: str, parts: models.SDXLParts, accelerator, prompts: list[EvalPrompt],
               tracker: Tracker, global_step: int, weights=None) -> None:
    """Render eval.<phase> (live or final) on the main process, log its grid; `weights` may swap EMA in."""
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
    accelerator.wait_for_everyone()


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


def train(cfg: Config, cache_only: bool = False, overwrite: bool = False) -> dict:
    """Run one training (or only build the caches); return a summary (steps, losses, how it ended)."""
    if cache_only:
        check_cache_only(cfg)
    accelerator = make_accelerator(cfg)
    setup_logging(accelerator.is_main_process)
    describe_processes(accelerator)
    log.info("config %s resolved (saved with every output as sdxl_ff_config.json):\n%s", cfg.source,
             "\n".join(f"  {key}: {json.dumps(value)}" for key, value in to_dict(cfg).items()))
    t = cfg.training
    check_export(cfg)
    check_output_folders(cfg, accelerator)
    if not t.resume_from and not cache_only:
        check_fresh_output(cfg, overwrite)
    resume = load_resume_state(cfg, accelerator)
    seed = resume["seed"] if resume else shared_seed(cfg, accelerator)
    if resume:
        log.info("resume: from %s at step %d (seed %d from the state)", t.resume_from, resume["global_step"], seed)
    e = cfg.eval
    prompts = load_prompts(e.prompts_path, e.height, e.width) if e.live.enabled or e.final.enabled else []
    seed_everything(seed)
    train_set, sampler = data_lib.build_data(cfg, seed, accelerator.num_processes, accelerator.process_index)
    total_steps = total_optimizer_steps(cfg, len(sampler))
    if resume:
        check_steps_left(cfg, resume["global_step"], total_steps)

    parts = models.load_configured_model(cfg, t.resume_from)
    if prompts:  # the loaded model may have zero terminal SNR from its own scheduler config
        check_diffusers_backend(e, parts.scheduler.config)
    trainables = configure_modules(parts, cfg, accelerator)
    prepare_caches(cfg, parts, train_set, accelerator)
    if cache_only:
        log.info("--cache-only: caches are complete; not training")
        return {"global_step": 0, "losses": [], "seconds": 0.0, "seed": seed, "interrupted": None}
    loader = data_lib.make_loader(cfg, train_set, sampler, pin_memory=accelerator.device.type == "cuda")
    precision = {"no": "fp32", "fp16": "fp16 autocast + GradScaler", "bf16": "bf16 autocast"}
    log.info("device: %s, precision: %s; %s", accelerator.device, precision[accelerator.mixed_precision],
             configure_attention(parts.unet, accelerator.device))
    fingerprint = run_fingerprint({n: getattr(parts, n) for n in ("unet", "text_encoder", "text_encoder_2")},
                                  list(trainables.modules), optimizer_kind(cfg))
    if resume:
        check_compatible(resume["fingerprint"], fingerprint, t.resume_state_path)
    # the same on every process: replicas must round their (identical) weights identically
    rounding_generator = torch.Generator(accelerator.device).manual_seed(seed)
    optimizer, optimizer_name = build_optimizer(cfg, trainables, rounding_generator)
    trained_modules, optimizer = prepare(accelerator, trainables, optimizer)
    for name, module in zip(trainables.modules, trained_modules, strict=True):
        setattr(parts, name, module)
    if cfg.model.use_torch_compile:
        parts.unet = compile_unet(parts.unet, cfg.model.torch_compile_kwargs)
    scheduler = parts.noise_scheduler()
    weighting = LossWeighting(scheduler.config.prediction_type, t.snr_gamma, t.min_sigma, t.min_sigma_warmup_steps)
    log.info("objective: %s prediction%s; loss weighting: %s", scheduler.config.prediction_type,
             ", zero terminal SNR" if t.zero_terminal_snr else "", weighting)
    n_params = sum(p.numel() for p in trainables.parameters())
    log.info("training %s (%.1f M parameters), optimizer: %s", ", ".join(trainables.modules), n_params / 1e6,
             optimizer_name)

    rates = learning_rates(cfg)
    base_lrs = [rates[group["name"]] for group in optimizer.param_groups]
    if accelerator.is_main_process:
        log.info("learning rate: %s; planned curve: %s", describe(t), write_planned_curve(t, total_steps))
    effective_batch = sampler.batch_size * t.grad_accum_steps * accelerator.num_processes
    log.info("batch %d x accumulation %d = effective batch %d; %d optimizer steps", sampler.batch_size,
             t.grad_accum_steps, effective_batch, total_steps)
    if prompts:
        log.info("eval: %d prompt(s), backend %s, %s, %d steps, cfg %g, empty negative prompt: %s", len(prompts),
                 e.backend, describe_names(e), e.num_inference_steps, e.cfg_scale, empty_negative(e))
    tracker = Tracker(cfg, accelerator.is_main_process)
    tracker.log_run(cfg, effective_batch, len(train_set), dict(Counter(train_set.sizes)))
    # Every process draws the randomness of the whole global batch and keeps its share (sdxl_ff/step.py),
    # so N processes see exactly the noise one process would.
    noise_generator = torch.Generator().manual_seed(seed)
    shard = Shard(accelerator.process_index, accelerator.num_processes)
    global_step, epoch, next_index, losses = 0, 0, 0, []
    if resume:
        restore(resume, optimizer, accelerator, noise_generator, rounding_generator, rates)
        global_step, epoch, next_index = resume["global_step"], resume["epoch"], resume["batch_in_epoch"]
        if "sampler" in resume:
            sampler.check_order(resume["sampler"])
        losses = list(resume["losses"])
        set_rng_state(resume["rng"])
    # only the main process saves and evaluates the EMA: the others would keep a copy of the weights for nothing
    ema = ema_for(cfg.model.use_ema and accelerator.is_main_process, trainables.modules, cfg.model.ema_decay,
                  t.ema_update_every, t.lr_warmup_steps, cfg.model.ema_on_cpu)
    if ema is not None and resume and resume.get("ema"):
        ema.load_state_dict(resume["ema"])
    del resume  # its optimizer state and EMA (gigabytes for SDXL) now live in the optimizer and the EMA
    ema_for_eval = ema if ema is not None and e.use_ema else None
    checkpointer = Checkpointer(t.output_dir, t.keep_checkpoints)
    if accelerator.is_main_process:  # only the main process writes checkpoints
        checkpointer.remove_leftovers()
    batches = endless_batches(loader, sampler, epoch=epoch, start=next_index)
    tokenizers = (parts.tokenizer, parts.tokenizer_2)
    params = trainables.parameters()

    def trainer_state(with_ema: bool = True) -> dict:  # save_final reads the EMA itself, while swapped in
        return {
            "global_step": global_step, "epoch": epoch, "batch_in_epoch": next_index, "seed": seed,
            "sampler": sampler.state_dict(epoch, next_index),
            "optimizer": optimizer.state_dict(),
            "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
            "noise_generator": noise_generator.get_state(), "rng": rng_state(),
            "rounding_generator": rounding_generator.get_state(),
            "model_id": cfg.model.id, "trained": list(trainables.modules), "fingerprint": fingerprint,
            "losses": losses, "ema": ema.state_dict() if ema is not None and with_ema else None,
            "base_lrs": rates, "lr_factor": lr_factor(max(1, global_step), t, total_steps),
        }

    def save_checkpoint() -> Path | None:
        path = None
        if accelerator.is_main_process:
            path = checkpointer.save(global_step, lambda tmp: write_model_folder(
                tmp, cfg, parts, trainables, accelerator, trainer_state()))
            log.info("checkpoint: %s", path)
        accelerator.wait_for_everyone()
        return path

    progress = tqdm(total=total_steps, initial=global_step, desc="training", unit="step",
                    disable=not accelerator.is_main_process, dynamic_ncols=True)
    started, first_step, interrupted = time.time(), global_step, None
    with StopRequest() as stop:
        while global_step < total_steps:
            step_loss = 0.0
            set_learning_rates(optimizer, base_lrs, lr_factor(global_step + 1, t, total_steps))
            for micro in range(t.grad_accum_steps):
                epoch, index, batch = next(batches)
                next_index = index + 1
                sync = micro == t.grad_accum_steps - 1
                with contextlib.ExitStack() as stack:
                    if not sync:  # accumulate locally; gradients are all-reduced once, on the last micro-batch
                        for module in trained_modules:
                            stack.enter_context(accelerator.no_sync(module))
                    with accelerator.autocast():
                        out = predict(parts.unet, parts.vae, tokenizers, (parts.text_encoder, parts.text_encoder_2),
                                      scheduler, batch, noise_generator, noise_offset=t.noise_offset,
                                      shard=shard, device=accelerator.device)
                    loss = weighted_loss(out, scheduler, weighting, global_step + 1)
                    if t.detect_anomaly and not loss_is_finite_everywhere(accelerator, loss):
                        raise AnomalyError(anomaly_message(loss.item(), global_step + 1, batch["path"],
                                                           last_good_state(cfg, checkpointer)))
                    accelerator.backward(loss / t.grad_accum_steps)
                step_loss += loss.item() / t.grad_accum_steps
            grad_norm = None if t.fused_backward else clip_gradients(accelerator, params, t.max_grad_norm,
                                                                     measure=tracker.wants_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            global_step += 1
            if ema is not None:
                ema.update(global_step)
            step_loss = mean_over_processes(step_loss, accelerator)
            losses.append(step_loss)
            progress.update(1)
            progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}", epoch=epoch)
            if accelerator.is_main_process and (global_step % t.log_every == 0 or global_step == total_steps):
                recent = losses[-t.log_every:]
                progress.write(f"step {global_step}/{total_steps}  loss {sum(recent) / len(recent):.4f}  "
                               f"epoch {epoch}")
            tracker.log_step(global_step, step_loss, optimizer, grad_norm, accelerator.scaler)
            if e.live.enabled and global_step % e.live.every_n_steps == 0:
                eval_phase(cfg, "live", parts, accelerator, prompts, tracker, global_step,
                           weights=ema_for_eval.applied() if ema_for_eval else None)
            # a stop asked for at the last step lets the run finish: its checkpoint would have nothing left to resume
            if global_step < total_steps and stop_agreed(stop, accelerator):
                interrupted = (stop.signal_name or "SIGINT", save_checkpoint())
                break
            if t.checkpoint_every and global_step % t.checkpoint_every == 0 and global_step < total_steps:
                save_checkpoint()
    progress.close()
    elapsed = time.time() - started
    if interrupted:
        tracker.close()
        signal_name, path = interrupted
        if accelerator.is_main_process:  # the path of the checkpoint is known there only
            log.warning("stopped by %s at step %d/%d; saved %s. Resume with:\n  %s", signal_name, global_step,
                        total_steps, path, resume_command(cfg, path))
        return {"global_step": global_step, "losses": losses, "seconds": elapsed, "seed": seed,
                "interrupted": signal_name, "checkpoint": str(path)}

    if accelerator.is_main_process:
        save_final(cfg, parts, trainables, accelerator, trainer_state(with_ema=False), ema)
    accelerator.wait_for_everyone()
    if cfg.export.save_single_file and accelerator.is_main_process:
        export_single_file(cfg.export, cfg.training.output_dir)
    if e.final.enabled:
        eval_phase(cfg, "final", parts, accelerator, prompts, tracker, global_step,
                   weights=ema_for_eval.applied() if ema_for_eval else None)
    tracker.close()
    done = global_step - first_step
    log.info("done: %d steps in %.1f s (%.3f s/step)", done, elapsed, elapsed / max(1, done))
    return {"global_step": global_step, "losses": losses, "seconds": elapsed, "seed": seed, "interrupted": None}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(main_process=True)
    if args.save_tiny_model:
        models.save_pipeline(models.build_tiny_sdxl(), args.save_tiny_model)
        log.info("wrote the tiny SDXL to %s", args.save_tiny_model)
        return 0
    cfg = None
    try:
        cfg = load_config(args.config, args.overrides)
        result = train(cfg, cache_only=args.cache_only, overwrite=args.overwrite)
    except KeyboardInterrupt:  # outside the loop's own handling: loading, cache building, a second Ctrl-C
        print(f"\nerror: interrupted (Ctrl-C){interrupted_hint(cfg) if cfg else ''}", file=sys.stderr)
        return 130
    except (ConfigError, data_lib.DataError, ResumeError, SaveError, ExportFailed) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except AnomalyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    if result["interrupted"]:
        return 128 + signal.Signals[result["interrupted"]].value
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())

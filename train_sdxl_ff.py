"""Full fine-tuning of Stable Diffusion XL, driven by one JSON config.

    python train_sdxl_ff.py [--config config.json] [--set training.num_steps=100 ...]
    accelerate launch train_sdxl_ff.py --config config.json

`train()` below reads like the algorithm: build the run, then step (`train_step`: get batch, forward, loss,
backward, step) and `run.after_step()` (log, validate, evaluate, save) until done, then `run.finish()`.
The run lives in sdxl_ff/train/run.py, one step in sdxl_ff/train/step.py; the rest in the rooms of sdxl_ff/.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time

from sdxl_ff.config.errors import ConfigError, UserError
from sdxl_ff.config.load import add_config_arguments, load_config, to_dict
from sdxl_ff.config.rules import scheduler_timestep_errors
from sdxl_ff.config.schema import Config
from sdxl_ff.parallel.launch import check_launch_environment
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
    cfg = None if args.save_tiny_model else load_config(args.config, args.overrides)
    if cfg is not None and not args.plan:  # a run: `accelerate launch --use_fsdp` stops every process here
        check_launch_environment(os.environ)
    return args, cfg


if __name__ == "__main__":  # a config mistake is reported at once, before the imports below (seconds) are paid
    try:
        COMMAND_LINE = read_command_line(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)

# bitsandbytes warns at import that an optional CPU kernel package is missing; it is not needed here.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

from accelerate import Accelerator  # noqa: E402
from torch.utils.data import DataLoader

from sdxl_ff.checkpoint.checkpointer import StopRequest
from sdxl_ff.checkpoint.lock import run_lock
from sdxl_ff.checkpoint.model_folder import (
    check_fresh_output,
    check_output_folders,
    check_room_for_final_save,
    interrupted_hint,
)
from sdxl_ff.data import dataset as data_lib
from sdxl_ff.data.caches import check_cache_only, prepare_caches
from sdxl_ff.eval.backends import EvalPrompt, check_diffusers_backend
from sdxl_ff.eval.evaluation import load_prompts
from sdxl_ff.eval.validation import make_validator, validation_set
from sdxl_ff.export.export_step import ExportInterrupted, check_export
from sdxl_ff.model import parts as models
from sdxl_ff.model.attention import configure_attention
from sdxl_ff.model.trainables import Trainables, configure_modules
from sdxl_ff.parallel.accelerator import make_accelerator
from sdxl_ff.parallel.processes import describe_processes, shared_seed
from sdxl_ff.parallel.strategy import Parallelism
from sdxl_ff.plan.auto import plan_text, resolve_memory_mode
from sdxl_ff.plan.report import MemoryCheck, detected_gpu_gib
from sdxl_ff.runtime.gpu_settings import apply_speed_settings
from sdxl_ff.runtime.rng import seed_everything
from sdxl_ff.runtime.wsl import pin_memory_for
from sdxl_ff.train.run import Run
from sdxl_ff.train.step import check_steps_left, endless_batches, total_optimizer_steps, train_step


def start(cfg: Config, cache_only: bool,
          overwrite: bool) -> tuple[Accelerator, Parallelism, int, dict | None, list[EvalPrompt]]:
    """(the accelerator, the run's parallelism, the seed, the resumed state or None, the eval prompts): the output
    folders, the state and the prompts are checked before anything loads."""
    if cache_only:
        check_cache_only(cfg)
    accelerator = make_accelerator(cfg)
    parallel = Parallelism.for_run(cfg, accelerator)
    setup_logging(accelerator.is_main_process)
    quiet_libraries()  # transformers' per-save and per-load progress bars too
    describe_processes(accelerator)
    resolve_memory_mode(cfg, accelerator.device, accelerator.num_processes)  # "auto": before it is logged and saved
    log.info("config %s resolved (saved with every output as sdxl_ff_config.json):\n%s", cfg.source,
             "\n".join(f"  {key}: {json.dumps(value)}" for key, value in to_dict(cfg).items()))
    t, e = cfg.training, cfg.eval
    check_export(cfg)
    check_output_folders(cfg, accelerator)
    if not t.resume_from and not cache_only:
        check_fresh_output(cfg, overwrite)
    resume = parallel.resume_state()
    seed = resume["seed"] if resume else shared_seed(cfg, accelerator)
    if resume:
        log.info("resume: from %s at step %d (seed %d from the state)", t.resume_from, resume["global_step"], seed)
    prompts = load_prompts(e.prompts_path, e.height, e.width) if e.live.enabled or e.final.enabled else []
    seed_everything(seed)
    return accelerator, parallel, seed, resume, prompts


def load_model(cfg: Config, accelerator: Accelerator, prompts: list[EvalPrompt],
               cache_only: bool) -> tuple[models.SDXLParts, Trainables]:
    """The configured SDXL (training.resume_from's weights when resuming), checked against the config, with the
    trained modules configured."""
    parts = models.load_configured_model(cfg, cfg.training.resume_from)
    if timestep_errors := scheduler_timestep_errors(cfg, parts.scheduler.config.num_train_timesteps):
        raise ConfigError("; ".join(timestep_errors))  # a model whose scheduler load_config could not read
    if accelerator.is_main_process and not cache_only:
        check_room_for_final_save(cfg, parts)
    if prompts:  # the loaded model may have zero terminal SNR from its own scheduler config
        check_diffusers_backend(cfg.eval, parts.scheduler.config)
    return parts, configure_modules(parts, cfg, accelerator)


def loader_for(cfg: Config, accelerator: Accelerator, parts: models.SDXLParts,
               train_set: data_lib.CaptionedImageDataset, sampler: data_lib.SameSizeBatchSampler) -> DataLoader:
    """The data loader, and the device's attention and speed settings for the shapes it yields (logged)."""
    loader = data_lib.make_loader(cfg, train_set, sampler,
                                  pin_memory=pin_memory_for(accelerator.device.type, cfg.data.num_workers))
    precision = {"no": "fp32", "fp16": "fp16 autocast + GradScaler", "bf16": "bf16 autocast"}
    log.info("device: %s, precision: %s; %s", accelerator.device, precision[accelerator.mixed_precision],
             configure_attention(parts.unet, accelerator.device))
    m = cfg.model
    log.info("%s", apply_speed_settings(parts.unet, accelerator.device, allow_tf32=m.allow_tf32,
                                        channels_last=m.channels_last, cudnn_benchmark=m.cudnn_benchmark,
                                        distinct_shapes=len(set(train_set.sizes))))
    return loader


def train(cfg: Config, cache_only: bool = False, overwrite: bool = False) -> dict:
    """Run one training (or only build the caches); return a summary (steps, losses, how it ended)."""
    accelerator, parallel, seed, resume, prompts = start(cfg, cache_only, overwrite)
    train_set, sampler = data_lib.build_data(cfg, seed, accelerator.num_processes, accelerator.process_index)
    total_steps = total_optimizer_steps(cfg, len(sampler))
    if resume:
        check_steps_left(cfg, resume["global_step"], total_steps)
    memory_check = MemoryCheck.start(cfg, accelerator.device, accelerator.is_main_process)  # CUDA: plan vs card
    parts, trainables = load_model(cfg, accelerator, prompts, cache_only)
    train_set, val_set = prepare_caches(cfg, parts, accelerator, train_set, validation_set(cfg, train_set))
    if cache_only:
        log.info("--cache-only: caches are complete; not training")
        return {"global_step": 0, "losses": [], "seconds": 0.0, "seed": seed, "interrupted": None}
    loader = loader_for(cfg, accelerator, parts, train_set, sampler)
    run = Run(cfg, accelerator, parallel, parts, trainables, sampler, seed, total_steps, resume, prompts=prompts,
              validator=make_validator(cfg, val_set), memory_check=memory_check)
    del resume  # its optimizer state and EMA (gigabytes for SDXL) now live in the optimizer and the EMA

    p = run.progress
    batches = endless_batches(loader, sampler, epoch=p.epoch, start=p.batch_in_epoch)
    started, interrupted = time.time(), None
    if run.validator is not None and p.global_step == 0:
        run.validate()  # the curve's starting point: the weights as loaded
    with StopRequest() as stop:
        while p.global_step < total_steps and not interrupted:
            result = train_step(run, batches, stop)
            interrupted = run.after_step(result, stop)
    return run.finish(interrupted, time.time() - started)


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

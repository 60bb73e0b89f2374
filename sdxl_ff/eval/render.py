"""Rendering images from a saved model with the trainer's own eval code: the work of sample.py.

The model loads as the trainer loads one (models.load_parts); the EMA comes from the folder's trainer state
when it holds one; each image is drawn by evaluation.render_image, the function eval.live and eval.final draw
with, in the precision the run's eval used. Same settings, same pixels.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sdxl_ff.checkpoint.checkpointer import STATE_NAME, Checkpointer, load_state
from sdxl_ff.config.errors import ConfigError, UserError
from sdxl_ff.config.schema import ModelConfig
from sdxl_ff.eval.backends import EvalPrompt, check_diffusers_backend, empty_negative
from sdxl_ff.eval.evaluation import describe_names, load_prompts, render_image
from sdxl_ff.eval.sample_options import SampleError, SampleRequest, image_paths, in_cli_words
from sdxl_ff.model import parts as models
from sdxl_ff.model.attention import configure_attention
from sdxl_ff.parallel.accelerator import mixed_precision
from sdxl_ff.runtime.files import write_atomic
from sdxl_ff.runtime.gpu_settings import set_tf32

log = logging.getLogger("sdxl_ff")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
PRECISION_NAMES = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}  # accelerate's mixed_precision -> --precision


def run_settings(model: str) -> dict:
    """The `model` section of the run that wrote this folder (its sdxl_ff_config.json), else the defaults."""
    try:
        saved = json.loads((Path(model).expanduser() / "sdxl_ff_config.json").read_text(encoding="utf-8"))["model"]
    except (OSError, ValueError, KeyError, TypeError):
        saved = {}
    defaults = ModelConfig()
    return {key: saved.get(key, getattr(defaults, key)) for key in ("use_bf16", "allow_tf32", "channels_last")}


def ema_weights(model: str, use_ema: bool) -> tuple[dict[str, torch.Tensor] | None, str]:
    """(the EMA tensors to put into the model, or None; what the weights are, for the log).

    The trainer keeps the EMA in two ways: a checkpoint holds the trained weights and, in trainer_state.pt,
    the EMA (`ema.shadow`); the final save of a model.use_ema run holds the EMA in place of the trained weights
    (`ema_in_weights`).
    """
    folder = Path(model).expanduser()
    if not (folder / STATE_NAME).is_file():
        return None, "the model's own weights (no trainer state beside them, so no EMA)"
    try:
        state = load_state(folder / STATE_NAME)
    except UserError as e:
        raise SampleError(f"--model: {e}") from None
    ema, step = state.get("ema"), state["global_step"]
    if state.get("ema_in_weights"):
        if not use_ema:
            kept = [p for p in Checkpointer(folder, None).existing() if (p / STATE_NAME).is_file()]
            hint = (f"a checkpoint keeps them with the EMA beside them, e.g. --model {kept[-1]} --no-ema" if kept
                    else "the run kept no checkpoint that has them")
            raise SampleError(f"--no-ema: {folder} holds the EMA weights in place of the trained ones (the final "
                              f"save of a model.use_ema run); {hint}")
        return None, f"the EMA weights of step {step} (saved in place of the trained ones)"
    if not ema or (ema.get("shadow") is None and not ema.get("shadow_in_shards")):
        why = "the EMA had not started" if ema else "the run kept no EMA"
        return None, f"the trained weights of step {step} ({why})"
    if not use_ema:
        return None, f"the trained weights of step {step} (--no-ema: the EMA beside them is not used)"
    if ema.get("shadow_in_shards"):
        raise SampleError(f"--model: {folder} is a sharded (fsdp2) checkpoint whose EMA lies in its sharded_state/ "
                          f"shards, which sample.py does not read; pass --no-ema for the trained weights, or sample "
                          f"the run's final output (its EMA is saved as its weights)")
    return ema["shadow"], f"the EMA weights of step {step} (from {STATE_NAME}; --no-ema for the trained ones)"


@torch.no_grad()
def put_ema(parts: models.SDXLParts, shadow: dict[str, torch.Tensor], model: str) -> None:
    """Copy the EMA (keys `<module>.<parameter>`, ema.py) into the loaded modules, as EMA.swap_in does."""
    for key, value in shadow.items():
        module_name, _, name = key.partition(".")
        try:
            param = getattr(parts, module_name).get_parameter(name)
        except AttributeError:
            param = None
        if param is None or param.shape != value.shape:
            raise SampleError(f"--model: the EMA in {Path(model) / STATE_NAME} does not fit the model beside it "
                              f"({key}); pass --no-ema to sample the folder's weights")
        param.copy_(value.to(param.dtype))


def choose_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise SampleError("--device cuda: no CUDA device is visible; use --device cpu or check the driver (nvidia-smi)")
    return torch.device("cuda" if name != "cpu" and torch.cuda.is_available() else "cpu")


def read_prompts(request: SampleRequest) -> list[EvalPrompt]:
    e = request.eval
    if request.prompts_file is None:
        return [EvalPrompt(0, request.prompt, request.negative, request.seed, e.height, e.width)]
    try:
        return load_prompts(request.prompts_file, e.height, e.width)
    except ConfigError as err:
        raise SampleError(in_cli_words(str(err))) from None


def load_model(request: SampleRequest, device: torch.device, settings: dict) -> models.SDXLParts:
    """The parts on `device` in eval mode, with the EMA when wanted and kept; the run's GPU settings applied."""
    shadow, weights = ema_weights(request.model, request.use_ema)
    try:
        parts = models.load_parts(request.model, config_dir=request.config_dir)
        check_diffusers_backend(request.eval, parts.scheduler.config)  # the model may have zero terminal SNR
    except ConfigError as e:
        raise SampleError(in_cli_words(str(e))) from None
    if shadow is not None:
        put_ema(parts, shadow, request.model)
    log.info("model: %s; weights: %s", request.model, weights)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        getattr(parts, name).to(device).eval()
    if settings["channels_last"]:
        parts.unet.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        set_tf32(settings["allow_tf32"])
        log.info("%s; TF32 %s (the run's model.allow_tf32)", configure_attention(parts.unet, device),
                 "on" if settings["allow_tf32"] else "off")
    return parts


def sample(request: SampleRequest) -> list[Path]:
    """Draw every prompt of `request` into its file (each written atomically); return the files."""
    prompts = read_prompts(request)
    paths = image_paths(request.out, request.out_is_file, [p.file_name for p in prompts], request.overwrite)
    device = choose_device(request.device)
    settings = run_settings(request.config_dir or request.model)
    precision = request.precision or PRECISION_NAMES[mixed_precision(settings["use_bf16"], device.type == "cpu")]
    parts = load_model(request, device, settings)
    e = request.eval
    log.info("sampling %d image(s) on %s in %s: backend %s, %s, %d steps, cfg %g, empty negative prompt: %s",
             len(prompts), device, precision, e.backend, describe_names(e), e.num_inference_steps, e.cfg_scale,
             empty_negative(e))
    for n, (prompt, path) in enumerate(zip(prompts, paths, strict=True), start=1):
        # mininterval 0: every step shows (one takes seconds on SDXL), the last one too
        with tqdm(total=e.num_inference_steps, desc=f"image {n}/{len(prompts)}", unit="step", dynamic_ncols=True,
                  leave=False, mininterval=0) as bar:
            def progress(done: int, total: int, bar=bar) -> None:
                bar.total = total
                bar.update(done - bar.n)
            autocast = (torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])
                        if precision in AUTOCAST_DTYPES else contextlib.nullcontext())  # as the trainer's eval
            with torch.inference_mode(), autocast:
                image = render_image(parts, e, prompt, progress)
        write_atomic(path, lambda tmp, image=image: image.save(tmp, format="PNG"))
        log.info("wrote %s (seed %d, %dx%d)", path, prompt.seed, prompt.width, prompt.height)
    return paths

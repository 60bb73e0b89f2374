"""Rules that involve more than one config key: each returns error strings naming key, value and remedy.

`config.load_config()` runs `cross_check()` after every key has passed its own type and bounds
check; an empty list means the config is consistent.
"""

from __future__ import annotations

import json
from pathlib import Path

from sdxl_ff.config.sampler_names import eval_name_errors, model_schedule_errors
from sdxl_ff.config.schema import CHECKPOINT_SUFFIXES, Config, DataConfig
from sdxl_ff.config.sources import source_errors


def cross_check(cfg: Config) -> list[str]:
    """Rules that involve more than one key; an empty list when consistent."""
    t, m = cfg.training, cfg.model
    errors = []
    if t.num_steps is None and t.num_epochs is None:
        errors.append("training: set training.num_steps or training.num_epochs (at least one is required)")
    for n, trained in ((1, m.train_text_encoder_1), (2, m.train_text_encoder_2)):
        if trained and getattr(t, f"lr_text_encoder_{n}") is None:
            errors.append(f"model.train_text_encoder_{n} is true but training.lr_text_encoder_{n} is not set; "
                          f"give it a learning rate or set model.train_text_encoder_{n} to false")
    if len(cfg.optimizer.betas) != 2 or not all(0 <= b < 1 for b in cfg.optimizer.betas):
        errors.append(f"optimizer.betas: {cfg.optimizer.betas} must be two numbers in [0, 1)")
    errors += weight_decay_errors(cfg)
    if cfg.optimizer.type == "adafactor":
        for key, default in (("betas", [0.9, 0.999]), ("eps", 1e-8)):
            if getattr(cfg.optimizer, key) != default:
                errors.append(f"optimizer.{key}: {json.dumps(getattr(cfg.optimizer, key))} is an AdamW setting, but "
                              f"optimizer.type is \"adafactor\" (which keeps no first moment and its own eps); "
                              f"remove the key or use an AdamW type")
    if m.full_bf16 and not m.use_bf16:
        errors.append("model.full_bf16 is true but model.use_bf16 is false; bf16 weights need bf16 compute: "
                      "set model.use_bf16 to true or model.full_bf16 to false")
    if t.fused_backward and t.grad_accum_steps > 1:
        errors.append(f"training.fused_backward steps each parameter as soon as its gradient is ready, so it "
                      f"cannot accumulate gradients: training.grad_accum_steps is {t.grad_accum_steps}; set it to "
                      f"1 (raise training.batch_size instead) or turn fused_backward off")
    if t.fused_backward and t.max_grad_norm is not None:
        errors.append(f"training.fused_backward cannot clip the global gradient norm (no two gradients exist at "
                      f"once): training.max_grad_norm is {t.max_grad_norm}; set it to null or turn fused_backward "
                      f"off")
    if t.resume_state_path and not t.resume_from:
        errors.append("training.resume_state_path is set but training.resume_from is not; set resume_from to the "
                      "Diffusers folder whose weights should be trained further")
    errors += memory_mode_errors(cfg)
    errors += run_name_errors(cfg.run.name)
    if not t.output_dir and not cfg.run.name:
        errors.append("training.output_dir is empty and run.name is not set; set one of them")
    if cfg.export.save_single_file and not cfg.export.checkpoint_path and not cfg.run.name:
        errors.append("export.checkpoint_path is empty and run.name is not set; set one of them")
    e = cfg.export
    wanted = CHECKPOINT_SUFFIXES["safetensors" if e.use_safetensors else "pickle"]
    if e.checkpoint_path and Path(e.checkpoint_path).suffix.lower() not in wanted:  # loaders go by the suffix
        errors.append(f"export.checkpoint_path {e.checkpoint_path!r} does not match export.use_safetensors "
                      f"{str(e.use_safetensors).lower()}; end it in {' or '.join(wanted)} (ComfyUI and A1111 read "
                      f"the format from the suffix), or set export.use_safetensors to "
                      f"{str(not e.use_safetensors).lower()}")
    return errors + eval_errors(cfg) + _data_problems(cfg.data) + objective_errors(cfg) + sharding_errors(cfg)


def weight_decay_errors(cfg: Config) -> list[str]:
    """Decoupled weight decay multiplies each weight by 1 − lr·weight_decay per step (AdamW, torchao's, Adafactor):
    at lr·weight_decay >= 1 it zeroes or flips the weights every step instead of shrinking them."""
    t, wd, errors = cfg.training, cfg.optimizer.weight_decay, []
    rates = {"training.lr_unet": t.lr_unet}
    for n in (1, 2):
        if getattr(cfg.model, f"train_text_encoder_{n}") and getattr(t, f"lr_text_encoder_{n}") is not None:
            rates[f"training.lr_text_encoder_{n}"] = getattr(t, f"lr_text_encoder_{n}")
    for key, lr in rates.items():
        if lr * wd >= 1:
            errors.append(f"optimizer.weight_decay: {json.dumps(wd)} with {key} {json.dumps(lr)} multiplies every "
                          f"weight by 1 - lr·weight_decay = {1 - lr * wd:g} each step, which zeroes or flips it; "
                          f"keep lr·weight_decay well below 1 (e.g. weight_decay 0.01)")
    return errors


def shards_model(cfg: Config) -> bool:
    """training.sharding "fsdp2": the trained modules are sharded over the processes (the run's parallelism,
    sdxl_ff/parallel/strategy.py, and the memory plan follow from it)."""
    return cfg.training.sharding == "fsdp2"


def sharding_errors(cfg: Config) -> list[str]:
    """training.sharding "fsdp2": the memory modes that cannot run on FSDP2's sharded parameters, refused by name."""
    t, m = cfg.training, cfg.model
    if not shards_model(cfg):
        return []
    why = {
        "training.fused_backward": "FSDP2 reduce-scatters a block's gradients after its backward pass, so a "
                                   "parameter's gradient is not complete when the fused step would use it",
        "model.full_bf16": "sharded bf16 weights with stochastic rounding are not tested by sdxl-ff; under fsdp2 "
                           "model.use_bf16 already computes in bf16 from fp32 weight shards (4/N bytes each)",
        "model.use_torch_compile": "compiling a fully_shard-ed UNet is not tested by sdxl-ff",
        "validation.enabled": "the validation loss runs a different number of images on each process, and a "
                              "sharded forward pass needs every process",
    }
    on = {"training.fused_backward": t.fused_backward, "model.full_bf16": m.full_bf16,
          "model.use_torch_compile": m.use_torch_compile, "validation.enabled": cfg.validation.enabled}
    errors = [f"training.sharding is \"fsdp2\" but {key} is {json.dumps(on[key])}: {reason}; set {key} to false or "
              f"training.sharding to \"none\"" for key, reason in why.items() if on[key]]
    if cfg.optimizer.type == "adafactor":
        errors.append("training.sharding is \"fsdp2\" but optimizer.type is \"adafactor\": transformers' Adafactor "
                      "cannot step FSDP2's sharded parameters (DTensor); use \"adamw8bit\" (torchao's, 8-bit state "
                      "per shard) or \"adamw\", or set training.sharding to \"none\"")
    return errors


def buckets_fix_the_batch(cfg: Config) -> bool:
    """Whether data.bucket's own batch sizes replace training.batch_size (so auto cannot choose it)."""
    b = cfg.data.bucket
    return b.enabled and (b.batch_size is not None or bool(b.per_resolution_batch_sizes))


def memory_mode_errors(cfg: Config) -> list[str]:
    """memory_mode "auto" splits training.effective_batch_size: a batch_size or grad_accum_steps written alone must
    divide it (both written, they are the split, and effective_batch_size is unused: config_warnings)."""
    t, total = cfg.training, cfg.training.effective_batch_size
    if total is None or effective_batch_unused(cfg):
        return []
    for key in ("batch_size", "grad_accum_steps"):
        value = getattr(t, key)
        if cfg.is_explicit(f"training.{key}") and total % value:
            return [f"training.effective_batch_size {total} is not divisible by training.{key} {value}; give a "
                    f"divisor of it, or remove training.{key} (memory_mode \"auto\" then chooses it)"]
    return []


def effective_batch_unused(cfg: Config) -> str | None:
    """Why training.effective_batch_size (when set) is not read; None when it is."""
    t = cfg.training
    if t.effective_batch_size is None:
        return None
    if cfg.model.memory_mode != "auto":
        return "model.memory_mode is \"manual\": training.batch_size × grad_accum_steps is the effective batch"
    if buckets_fix_the_batch(cfg):
        return "data.bucket.batch_size / per_resolution_batch_sizes fix the micro-batch"
    if cfg.is_explicit("training.batch_size") and cfg.is_explicit("training.grad_accum_steps"):
        return (f"training.batch_size and training.grad_accum_steps are both set ({t.batch_size} × "
                f"{t.grad_accum_steps})")
    return None


def run_name_errors(name: str) -> list[str]:
    """run.name becomes a folder and file name below run.output_root: it must not lead out of it."""
    if "/" in name or "\\" in name or name in (".", ".."):
        return [f"run.name: {json.dumps(name)} is not a plain folder name; it names the output below "
                f"run.output_root, so it may not contain '/' or '\\' or be '.' or '..' (use e.g. \"v004\"; "
                f"set run.output_root or training.output_dir to write elsewhere)"]
    return []


def config_warnings(cfg: Config) -> list[str]:
    """Keys that have no effect in this config but are harmless to keep (e.g. a frozen encoder's rate)."""
    warnings = []
    for n in (1, 2):
        rate = getattr(cfg.training, f"lr_text_encoder_{n}")
        if rate is not None and not getattr(cfg.model, f"train_text_encoder_{n}"):
            warnings.append(f"training.lr_text_encoder_{n} is {rate:g} but model.train_text_encoder_{n} is false: "
                            f"text encoder {n} stays frozen and the rate is not used")
    if why := effective_batch_unused(cfg):
        warnings.append(f"training.effective_batch_size is {cfg.training.effective_batch_size} but {why}; it is not "
                        f"used")
    tc = cfg.data.text_embedding_cache
    if tc.variants != type(tc)().variants and not tc.enabled:
        warnings.append(f"data.text_embedding_cache.variants is {tc.variants} but the text-embedding cache is off: "
                        f"shuffled captions are drawn freely and the setting is not used")
    return warnings


def eval_errors(cfg: Config) -> list[str]:
    """eval.*: names valid for the backend, live evals with a period, EMA weights only when kept."""
    e = cfg.eval
    errors = eval_name_errors(e.backend, e.sampler_name, e.scheduler)
    if not errors:  # a model that has zero terminal SNR of its own is checked when it is loaded
        errors = model_schedule_errors(e.backend, e.sampler_name, e.scheduler, cfg.training.zero_terminal_snr)
    if e.live.enabled and e.live.every_n_steps is None:
        errors.append("eval.live.enabled is true but eval.live.every_n_steps is not set; give it a step count")
    if e.final.every_n_steps is not None:
        errors.append(f"eval.final.every_n_steps: {e.final.every_n_steps}, but the final eval runs once, after "
                      f"training; remove the key (a period belongs to eval.live.every_n_steps)")
    for key in ("height", "width"):
        value = getattr(e, key)
        if value % 8:
            errors.append(f"eval.{key}: {value} is not a multiple of 8 (the VAE halves the image 3 times); use e.g. "
                          f"{value // 8 * 8} or {value // 8 * 8 + 8}")
    if e.use_ema and not cfg.model.use_ema:
        errors.append("eval.use_ema is true but model.use_ema is false: there are no EMA weights to sample with")
    return errors


def _data_problems(d: DataConfig) -> list[str]:
    errors = []
    if d.bucket.enabled:
        errors += bucket_problems(d.bucket.resolutions, d.bucket.divisible_by, d.bucket.per_resolution_batch_sizes)
    if d.latent_cache.enabled and d.random_crop:
        errors.append("data.random_crop is true with data.latent_cache.enabled: a random crop changes the latent "
                      "every epoch, so cached latents would be wrong; disable one of them")
    return errors + source_errors(d)


COMPILE_KWARGS = ("fullgraph", "dynamic", "backend", "mode", "options", "disable")


def objective_errors(cfg: Config) -> list[str]:
    """Rules of the training objective, LR schedule and torch.compile keys."""
    t, m, errors = cfg.training, cfg.model, []
    s = t.lr_scheduler
    if s is not None and s.type == "cosine_restarts" and s.cycle_steps is None:
        errors.append("training.lr_scheduler.cycle_steps: null, but type \"cosine_restarts\" needs the cycle length "
                      "in optimizer steps (e.g. 400)")
    if s is not None and s.type != "cosine_restarts":
        for key, value, default in (("cycle_steps", s.cycle_steps, None), ("cycle_mult", s.cycle_mult, 1.0)):
            if value != default:
                errors.append(f"training.lr_scheduler.{key}: {json.dumps(value)} only applies to type "
                              f"\"cosine_restarts\", but type is {json.dumps(s.type)}; remove the key or set type "
                              f"to \"cosine_restarts\"")
    if t.zero_terminal_snr and t.prediction_type == "epsilon":
        errors.append("training.zero_terminal_snr: true needs training.prediction_type \"v_prediction\" (ε cannot "
                      "be predicted from pure noise at SNR 0); set prediction_type to \"v_prediction\"")
    errors += sampling_errors(cfg) + validation_errors(cfg)
    if not errors and (timesteps := model_timesteps(cfg)) is not None:  # else checked once the model is loaded
        errors += scheduler_timestep_errors(cfg, timesteps)
    unknown = sorted(set(m.torch_compile_kwargs) - set(COMPILE_KWARGS))
    if unknown:
        errors.append(f"model.torch_compile_kwargs: unknown argument(s) {', '.join(unknown)}; "
                      f"torch.compile takes {', '.join(COMPILE_KWARGS)}")
    return errors


SAMPLER_KEYS = {"logit_mean": ("logit_normal", 0.0), "logit_std": ("logit_normal", 1.0), "mode_scale": ("mode", 1.29)}


def sampling_errors(cfg: Config) -> list[str]:
    """Timestep sampling, loss type and EMA warmup keys that only mean something together."""
    t, errors = cfg.training, []
    for key, (kind, default) in SAMPLER_KEYS.items():
        value = getattr(t, key)
        if value != default and t.timestep_sampling != kind:
            errors.append(f"training.{key}: {json.dumps(value)} only applies to timestep_sampling \"{kind}\", but "
                          f"timestep_sampling is {json.dumps(t.timestep_sampling)}; remove the key or set "
                          f"timestep_sampling to \"{kind}\"")
    if t.max_timestep is not None and t.max_timestep <= t.min_timestep:
        errors.append(f"training.max_timestep: {t.max_timestep} must be above training.min_timestep "
                      f"({t.min_timestep}); timesteps are drawn from [min_timestep, max_timestep)")
    if t.loss_type not in ("huber", "smooth_l1"):
        for key in ("huber_c", "huber_schedule"):
            if getattr(t, key) is not None:
                errors.append(f"training.{key}: {json.dumps(getattr(t, key))} only applies to loss_type \"huber\" "
                              f"or \"smooth_l1\" (the loss types with a threshold c), but loss_type is "
                              f"{json.dumps(t.loss_type)}; remove the key or change loss_type")
    if t.min_sigma_warmup_steps and t.min_sigma is None:
        errors.append(f"training.min_sigma_warmup_steps: {t.min_sigma_warmup_steps} delays training.min_sigma, but "
                      f"min_sigma is not set; set training.min_sigma (e.g. 0.5) or remove min_sigma_warmup_steps")
    if cfg.model.ema_warmup is not None and not cfg.model.use_ema:
        errors.append("model.ema_warmup is set but model.use_ema is false: there is no EMA to warm up; set "
                      "model.use_ema to true or remove model.ema_warmup")
    return errors


def validation_errors(cfg: Config) -> list[str]:
    """validation.*: one source of images, a period, distinct timesteps. While it is off (`enabled` is the
    switch, as for eval.live) the other keys may stay in the config and change nothing: no image is held out."""
    v, errors = cfg.validation, []
    if not v.enabled:
        return errors
    if (v.image_dir is None) == (v.split is None):
        errors.append("validation.enabled is true: set exactly one of validation.image_dir (a folder of held-out "
                      "images with captions) and validation.split (a fraction of data.image_dir, e.g. 0.05)")
    if v.every_n_steps is None:
        errors.append("validation.enabled is true but validation.every_n_steps is not set; give it a step count")
    if not v.timesteps or len(set(v.timesteps)) != len(v.timesteps) or min(v.timesteps) < 0:
        errors.append(f"validation.timesteps: {json.dumps(v.timesteps)} must be a non-empty list of distinct "
                      f"timesteps >= 0, e.g. [100, 300, 500, 700, 900]")
    return errors


SDXL_TIMESTEPS = 1000  # SDXL base's scheduler, and the built-in tiny model's (models.SDXL_SCHEDULE; a test ties them)
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


def model_timesteps(cfg: Config) -> int | None:
    """The scheduler's num_train_timesteps of the model the run will load (training.resume_from, else model.id), read
    from its scheduler_config.json without loading anything; None when only loading the model can tell (a hub id
    not in the local cache, a folder without a readable scheduler config)."""
    m = cfg.model
    model_id = cfg.training.resume_from or m.id
    if model_id == "builtin:tiny-sdxl":
        return SDXL_TIMESTEPS
    path = Path(model_id).expanduser()
    if path.is_file() and path.suffix in SINGLE_FILE_SUFFIXES:  # its scheduler comes from model.config_dir
        if not m.config_dir:
            return SDXL_TIMESTEPS  # diffusers' single-file loader borrows SDXL base's configs
        path = Path(m.config_dir).expanduser()
    if path.is_dir():
        file: Path | str | None = path / "scheduler" / "scheduler_config.json"
    elif path.exists() or model_id.startswith((".", "/", "~")) or model_id.count("/") != 1:
        return None  # no model here; loading it says what is wrong
    else:
        from huggingface_hub import try_to_load_from_cache  # a hub id: only the copy already downloaded is read
        file = try_to_load_from_cache(model_id, "scheduler/scheduler_config.json", revision=m.revision)
        if not isinstance(file, str):
            return None
    try:
        value = json.loads(Path(file).read_text(encoding="utf-8")).get("num_train_timesteps", SDXL_TIMESTEPS)
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def scheduler_timestep_errors(cfg: Config, num_train_timesteps: int) -> list[str]:
    """training.min_timestep / max_timestep and validation.timesteps against the scheduler's timesteps [0, T).

    Run at config time when `model_timesteps` can read T, else by the trainer as soon as the model is loaded."""
    t, v, n, errors = cfg.training, cfg.validation, num_train_timesteps, []
    if t.max_timestep is not None and t.max_timestep > n:
        errors.append(f"training.max_timestep: {t.max_timestep} is above the scheduler's {n} timesteps; use at most "
                      f"{n} (it is exclusive)")
    if t.min_timestep >= n:
        errors.append(f"training.min_timestep: {t.min_timestep} leaves no timestep of the scheduler's {n}; use at "
                      f"most {n - 1}")
    too_high = [step for step in v.timesteps if step >= n]
    if v.enabled and too_high:
        errors.append(f"validation.timesteps: {too_high} are not below the scheduler's {n} timesteps; use values in "
                      f"[0, {n - 1}]")
    return errors


def bucket_problems(resolutions: list[list[int]], divisible_by: int,
                    per_resolution_batch_sizes: dict[str, int]) -> list[str]:
    """Config errors of `data.bucket`; an empty list when consistent."""
    errors = []
    if not resolutions:
        errors.append("data.bucket.resolutions: the list is empty; give at least one [width, height]")
    for res in resolutions:
        if len(res) != 2 or min(res) < 1:
            errors.append(f"data.bucket.resolutions: {res} is not a [width, height] pair of positive integers")
        elif res[0] % divisible_by or res[1] % divisible_by:
            errors.append(f"data.bucket.resolutions: {res[0]}x{res[1]} is not divisible by "
                          f"data.bucket.divisible_by={divisible_by}; round it to a multiple of {divisible_by}")
    pairs = [f"{r[0]}x{r[1]}" for r in resolutions if len(r) == 2]
    known = set(pairs)
    if len(known) != len(pairs):  # malformed entries are reported above, not as duplicates
        errors.append(f"data.bucket.resolutions: {resolutions} lists a resolution twice")
    for key, size in per_resolution_batch_sizes.items():
        if key not in known:
            errors.append(f"data.bucket.per_resolution_batch_sizes: {key!r} is not one of data.bucket.resolutions "
                          f"({', '.join(sorted(known))}); add [{key.replace('x', ', ')}] to the resolutions "
                          f"or remove the key")
        elif size < 1:
            errors.append(f"data.bucket.per_resolution_batch_sizes.{key}: {size} must be at least 1")
    return errors

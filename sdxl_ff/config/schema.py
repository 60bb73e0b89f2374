"""The configuration's schema: every section and key declared once, with its type, default and limits.

Loading, validation, `--set` overrides and the derived paths (config.py) all follow from these declarations;
cross-key rules live in config_rules.py. Each key's `help=` text and each section's docstring are the words of
the configuration reference, docs/configuration.md (`python -m sdxl_ff.config.reference` writes it).
This module imports nothing of the package, so any module may take its section types from here without an
import cycle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


def opt(default: Any = None, *, lo: float | None = None, hi: float | None = None,
        lo_open: bool = False, hi_open: bool = False, pending: str | None = None,
        factory: Any = None, help: str | None = None) -> Any:  # noqa: A002 (argparse's word for it)
    """Declare a config field with optional numeric bounds and a `help` text (what it does, why its bounds).

    `pending` names the issue that will implement the key: until then any value
    other than the default is refused instead of being silently ignored.
    """
    meta = {"lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open, "pending": pending, "help": help}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------- sections

@dataclass
class EMAWarmupConfig:
    """An EMA warmup as diffusers' `EMAModel(use_ema_warmup=True)`: s steps after the EMA started, its decay is
    min(`model.ema_decay`, 1 − (1 + s/inv_gamma)^−power), so early weights are forgotten quickly (0.75 after 7
    steps with the defaults). Needs `model.use_ema`."""
    inv_gamma: float = opt(1.0, lo=0.0, lo_open=True, help=(
        "the s/inv_gamma of the warmup decay 1 − (1 + s/inv_gamma)^−power, s in steps since the EMA started; a larger "
        "value warms up more slowly"))
    power: float = opt(2 / 3, lo=0.0, lo_open=True, help=(
        "the power of the warmup decay 1 − (1 + s/inv_gamma)^−power (diffusers' default 2/3; a larger power reaches "
        "ema_decay sooner)"))


@dataclass
class ModelConfig:
    """The model to train, which parts of it are trained, and how it is held and computed."""
    id: str = opt("stabilityai/stable-diffusion-xl-base-1.0", help=(
        "the model: a hub id, a local Diffusers folder, a single-file SDXL checkpoint (`.safetensors`/`.ckpt`) or "
        "`builtin:tiny-sdxl`. An existing file that is no model is refused naming what it is (an image, a text file, "
        "a `model_index.json`: give its folder); a mistyped `builtin:` id gets a did-you-mean"))
    revision: str | None = opt(None, help="the hub revision (branch, tag or commit) of `id`; null: the default one")
    variant: str | None = opt(None, help="the weight variant to load, such as `fp16`; null: the plain weights")
    config_dir: str | None = opt(None, help=(
        "for a single-file `id`: a local Diffusers SDXL folder with at least the configs and tokenizers; null uses "
        "stabilityai/stable-diffusion-xl-base-1.0's from the hub cache"))
    use_ema: bool = opt(False, help=(
        "keep an exponential moving average (fp32) of the trained weights; the final save writes the EMA weights"))
    ema_decay: float = opt(0.9999, lo=0.0, hi=1.0, lo_open=True, hi_open=True, help=(
        "EMA decay d per optimizer step; the averaging horizon is 1/(1 − d) steps whatever "
        "`training.ema_update_every` is (each update uses d**N)"))
    use_bf16: bool = opt(True, help=(
        "bf16 autocast. false: fp16 autocast with a GradScaler on CUDA, fp32 on the CPU. Frozen modules compute in "
        "the autocast dtype but are saved exactly as loaded, never rounded; the VAE stays fp32 and computes in fp32 "
        "(encoding, the latent cache, eval decoding: SDXL's VAE overflows in fp16 to NaN latents and black images)"))
    use_gradient_checkpointing: bool = opt(False, help=(
        "recompute activations in the backward pass (UNet and trained encoders): much less memory, about 30 % "
        "slower"))
    full_bf16: bool = opt(False, help=(
        "train with bf16 weights and gradients (2 + 2 bytes per parameter instead of 4 + 4); torchao's AdamW "
        "updates each parameter in fp32 inside its kernel and rounds it back to bf16 stochastically, so small "
        "updates are not lost (no fp32 copy of any weight is kept; resumes bit for bit). Trained modules are saved "
        "in bf16. Needs `use_bf16: true`; refused with `training.sharding: \"fsdp2\"`"))
    train_text_encoder_1: bool = opt(True, help=(
        "train text encoder 1 (CLIP-L); needs `training.lr_text_encoder_1`"))
    train_text_encoder_2: bool = opt(False, help=(
        "train text encoder 2 (OpenCLIP-bigG); needs `training.lr_text_encoder_2`"))
    use_torch_compile: bool | Literal["regional"] = opt(False, help=(
        "`torch.compile` for the UNet. \"regional\" (recommended): each repeated block is compiled on its own "
        "(diffusers' `compile_repeated_blocks`: the BasicTransformerBlocks, plus every ResnetBlock2D) with dynamic "
        "shapes, so other buckets reuse the compiled code; the UNet's own forward stays eager. true: the whole UNet "
        "(slower to compile, and each new bucket shape compiles again); false: no compiling. Inductor by default "
        "(`torch_compile_kwargs`); every compile is logged with its time, the first steps are slow while it "
        "compiles. Saved weights never carry `_orig_mod.` prefixes. Refused with `training.sharding: \"fsdp2\"`"))
    torch_compile_cache_dir: str = opt("./cache/torch_compile", help=(
        "inductor's cache (`TORCHINDUCTOR_CACHE_DIR`) while `use_torch_compile` is on: compiled graphs and kernels "
        "are kept here, so a restart compiles in seconds instead of minutes; \"\": torch's default (a folder under "
        "the system's temporary directory)"))
    torch_compile_kwargs: dict = opt(factory=dict, help=(
        "arguments for `torch.compile`: `mode` (e.g. `\"max-autotune\"`), `backend`, `fullgraph`, `dynamic`, "
        "`options`, `disable`; anything else is refused"))
    memory_mode: Literal["manual", "auto"] = opt("manual", help=(
        "\"manual\": the memory keys as written. \"auto\": at start-up the memory planner picks, on a CUDA card, "
        "the fastest setting that fits the card with its margin: for the effective batch (`training."
        "effective_batch_size`, else `batch_size` × `grad_accum_steps`) the micro-batch and accumulation, "
        "`full_bf16`, `training.fused_backward` and `use_gradient_checkpointing`, trying them in the planner's "
        "order (largest micro-batch first; within it plain, then full_bf16, fused_backward, checkpointing). Keys "
        "written in the config or given with `--set` are kept. The choice and its reason are logged; without "
        "CUDA the fastest setting is taken and logged (there is no card to fit)"))
    ema_on_cpu: bool = opt(False, help=(
        "keep the EMA (fp32) in CPU memory instead of on the GPU: saves 4 bytes per trained parameter there; each "
        "update copies the weights to the CPU"))
    allow_tf32: bool = opt(True, help=(
        "TF32 tensor cores for fp32 matmuls and convolutions on CUDA (Ampere and newer): the fp32 parts (the VAE, "
        "frozen fp32 encoders, any fp32 compute) run at about fp16's mantissa (10 bits); SDXL's UNet in pure fp32 "
        "on an H100: 0.82 → 0.54 s/step. Logged at start-up; no effect on the CPU"))
    channels_last: bool = opt(False, help=(
        "put the UNet's weights in channels-last memory format (as diffusers' examples offer). On an H100 with bf16 "
        "no gain for SDXL's UNet at 1024² (0.77 vs 0.80 s/step), hence off; results stay within float tolerance"))
    cudnn_benchmark: bool | Literal["auto"] = opt("auto", help=(
        "`torch.backends.cudnn.benchmark`: cuDNN times every convolution algorithm once per input shape. \"auto\" "
        "turns it on when the run has at most 8 batch shapes (buckets) and says so in the log; true / false force it"))
    ema_warmup: EMAWarmupConfig | None = opt(None, help=(
        "an EMA warmup (`{\"inv_gamma\": 1.0, \"power\": 0.6667}`, table `model.ema_warmup`); null keeps the "
        "constant decay `ema_decay` exactly. Needs `use_ema`"))


@dataclass
class RunConfig:
    """The run's name and its output folders; `training.output_dir`, `training.state_path`,
    `training.tensorboard.log_dir` and `export.checkpoint_path` are derived from them when left empty."""
    name: str = opt("", help=(
        "the run's name: the output goes to `{output_root}/{name}` and `{checkpoint_root}/{name}.safetensors`. A "
        "plain folder name: no `/` or `\\`, not `.` or `..` (the output stays below `output_root`); a number is "
        "read as text"))
    output_root: str = opt(".output", help="base folder of the Diffusers outputs (`training.output_dir`)")
    checkpoint_root: str = opt("", help=(
        "base folder of single-file checkpoints (`export.checkpoint_path`); empty: `{output_root}/safetensors`"))


@dataclass
class LRSchedulerConfig:
    """A learning-rate curve over the run, a factor of each rate: warmup over W steps (n/W until n = W, no step at
    rate 0), then the `type`'s shape; `training.lr_warmup_steps` then only delays the EMA. The start-up log names
    the curve, and `<output_dir>/lr_schedule.png` shows it."""
    type: Literal["constant", "linear_decay", "cosine_decay", "cosine_restarts"] = opt("constant", help=(
        "after the warmup: `constant` 1; `linear_decay` / `cosine_decay` down to `min_factor` at the last step over "
        "the remaining steps; `cosine_restarts` (SGDR) the cosine decay repeated over cycles of `cycle_steps`, "
        "`cycle_steps`·`cycle_mult`, … steps, each ending at `min_factor`"))
    warmup_steps: int = opt(0, lo=0, help="linear warmup of the learning rate over this many optimizer steps")
    min_factor: float = opt(0.0, lo=0.0, hi=1.0, help=(
        "the factor the decaying types end at (the last step's, and each restart cycle's end)"))
    cycle_steps: int | None = opt(None, lo=1, help=(
        "cosine_restarts: the first cycle's length in optimizer steps, required by that type; refused with another"))
    cycle_mult: float = opt(1.0, lo=1.0, hi=100.0, help=(
        "cosine_restarts: each cycle is this many times longer than the one before (SGDR uses 2); at 100 the second "
        "cycle is already 100 cycles long, and far larger values overflow the cycle arithmetic. Refused with another "
        "type"))


@dataclass
class TensorBoardConfig:
    """TensorBoard events of the training (main process only): the loss, gradient norm, scaler, eval images."""
    enabled: bool = opt(False, help="write TensorBoard events (main process only)")
    base_dir: str = opt("./logs/tensorboard", help="what `tensorboard --logdir` should point at")
    log_dir: str = opt("", help=(
        "this run's event folder; empty: `{base_dir}/{run.name}` (the output folder's name without a run name)"))
    log_grad_norm: bool = opt(True, help=(
        "log the global gradient norm (after unscaling; measured even without `training.max_grad_norm`)"))
    log_scaler: bool = opt(True, help="log the AMP GradScaler's scale (fp16 runs; bf16 and fp32 have no scaler)")


@dataclass
class TrainingConfig:
    """How long and how fast to train, the training objective, stability, checkpoints and resume."""
    output_dir: str = opt("", help="the Diffusers output folder; empty: `{run.output_root}/{run.name}`")
    num_steps: int | None = opt(None, lo=1, help=(
        "stop after this many optimizer steps (with `num_epochs` too, whichever comes first; at least one is "
        "required). On resume it is the total including the resumed steps; a state already at or past it is refused"))
    num_epochs: int | None = opt(None, lo=1, help="stop after this many epochs (see `num_steps`)")
    lr_unet: float = opt(1e-5, lo=0.0, help=(
        "the UNet's learning rate (UNet, text encoder 1 and text encoder 2 are parameter groups with their own "
        "rates)"))
    lr_text_encoder_1: float | None = opt(None, lo=0.0, help=(
        "text encoder 1's learning rate; required when `model.train_text_encoder_1` is true; set for a frozen "
        "encoder it is unused and logged as a warning"))
    lr_text_encoder_2: float | None = opt(None, lo=0.0, help=(
        "text encoder 2's learning rate; required when `model.train_text_encoder_2` is true; set for a frozen "
        "encoder it is unused and logged as a warning"))
    seed: int | None = opt(None, lo=0, hi=2**32, hi_open=True, help=(  # torch and numpy seeds are 32/64-bit
        "seeds Python, NumPy, torch and the data order; null or 0 draws a random seed and logs it"))
    batch_size: int = opt(1, lo=1, help=(
        "micro-batch size; with buckets, `data.bucket.batch_size` replaces it when set"))
    grad_accum_steps: int = opt(1, lo=1, help=(
        "micro-batches per optimizer step: the effective batch is batch_size × grad_accum_steps × GPUs"))
    effective_batch_size: int | None = opt(None, lo=1, help=(
        "`model.memory_mode: \"auto\"` only: the images per optimizer step in each process, which auto splits into "
        "`batch_size` × `grad_accum_steps` (the largest micro-batch that fits); a `batch_size` or `grad_accum_steps` "
        "written alone must divide it. Not used (a warning) with \"manual\", with both of them written, or with "
        "`data.bucket.batch_size` / `per_resolution_batch_sizes`. null: `batch_size` × `grad_accum_steps`"))
    noise_offset: float = opt(0.0, lo=0.0, hi=1.0, help=(
        "offset noise, so the model can learn overall brightness and colour: each (sample, channel) gets a constant "
        "offset·z added to its unit-variance noise (published values 0.03-0.1); at 1 the offset is as strong as the "
        "noise itself, and huge values overflow float32 into a NaN loss"))
    min_sigma: float | None = opt(None, lo=1e-4, hi=100.0, help=(
        "weight every timestep as if its noise level σ were at least min_sigma (SNR clamped at 1/min_sigma², e.g. "
        "0.4); never changes the sampled timesteps; null: off. SDXL's σ runs from 0.029 (t = 0) to 14.6 (t = 999): "
        "below 1e-4 nothing is clamped, above 100 everything is, and beyond those 1/min_sigma² leaves float range (a "
        "zero loss, or a crash)"))
    min_sigma_warmup_steps: int = opt(0, lo=0, help=(
        "optimizer steps trained without min_sigma before it takes effect; refused without training.min_sigma"))
    prediction_type: Literal["epsilon", "v_prediction"] | None = opt(None, help=(
        "the training target: \"v_prediction\" trains against v = √ᾱ·ε − √(1−ᾱ)·x₀, \"epsilon\" against ε; null "
        "keeps the model's scheduler setting (epsilon for SDXL base). Saved in `scheduler/scheduler_config.json`"))
    zero_terminal_snr: bool = opt(False, help=(
        "rescale the betas so that the last timestep is pure noise (ᾱ_T = 0, Lin et al. 2024); needs "
        "`prediction_type: \"v_prediction\"`. The saved scheduler gets `rescale_betas_zero_snr` and "
        "`timestep_spacing: \"trailing\"`"))
    snr_gamma: float | None = opt(None, lo=1e-4, hi=1e4, help=(
        "Min-SNR-γ loss weighting (Hang et al. 2023; γ = 5 in the paper); null: off. SDXL's SNR runs from 0.0047 "
        "(t = 999) to 1,175 (t = 0), so γ beyond [1e-4, 1e4] acts as that end of the range does; a γ below "
        "float32's range (1e-45) would zero the loss"))
    timestep_sampling: Literal["uniform", "logit_normal", "mode"] = opt("uniform", help=(
        "how training timesteps are drawn: `uniform`, or SD3's densities `logit_normal` (`logit_mean`, "
        "`logit_std`) and `mode` (`mode_scale`)"))
    logit_mean: float = opt(0.0, lo=-10.0, hi=10.0, help=(
        "logit_normal timestep sampling: the mean of the normal whose sigmoid is the noise fraction (SD3: 0). At "
        "|mean| = 10 nearly every draw is already the first or last timestep. Refused with another sampling"))
    logit_std: float = opt(1.0, lo=0.0, hi=10.0, lo_open=True, help=(
        "logit_normal timestep sampling: the standard deviation of that normal (SD3: 1). At 10 most draws already "
        "land within 7 timesteps of either end. Refused with another sampling"))
    mode_scale: float = opt(1.29, lo=-1.0, hi=2 / (3.141592653589793 - 2), help=(  # SD3: a monotone density
        "mode timestep sampling: SD3's scale s (SD3: 1.29); its density is monotone for −1 ≤ s ≤ 2/(π − 2). Refused "
        "with another sampling"))
    min_timestep: int = opt(0, lo=0, help=(
        "the lowest timestep drawn; below the scheduler's number of timesteps (1000 for SDXL)"))
    max_timestep: int | None = opt(None, lo=1, help=(
        "timesteps are drawn from [min_timestep, max_timestep): above `min_timestep`, at most the scheduler's "
        "number of timesteps (read from the model's `scheduler_config.json` before it loads); null: that number"))
    timestep_shift: float | Literal["resolution"] | None = opt(None, lo=0.0, hi=1000.0, lo_open=True, help=(
        "SD3's timestep shift s (u -> s·u / (1 + (s - 1)·u)) of the noise fraction before it becomes a timestep "
        "(s > 1: noisier), or \"resolution\" for s = √(H·W / 1024²) of each batch's image size; null: off. At "
        "s = 1000 the median timestep is already 999 of 1000; near 3.4e38 s overflows float32 and draws t = 0"))
    loss_type: Literal["mse", "l1", "huber", "smooth_l1"] = opt("mse", help=(
        "the loss between prediction and target; Min-SNR-γ, min-sigma, debiasing and v-prediction apply to each"))
    huber_c: float | None = opt(None, lo=1e-4, hi=1.0, help=(
        "huber / smooth_l1 (refused with another loss type): the residual at which the loss turns from quadratic to "
        "linear; null: 0.1 (sd-scripts' default). Below 1e-4 the loss is nearly c·|d|, its gradients shrinking "
        "toward Adam's eps (1e-8); below float32's range (1e-45) c, and the loss, become 0"))
    huber_schedule: Literal["constant", "exponential", "snr"] | None = opt(None, help=(
        "huber / smooth_l1 (refused with another loss type): how c varies with the timestep, as sd-scripts; "
        "null: \"snr\""))
    debiased_estimation: bool = opt(False, help=(
        "weight each sample by 1/√SNR (ε) or 1/(SNR + 1) (v), SNR capped at 1000, as sd-scripts' "
        "`--debiased_estimation_loss`; multiplies with Min-SNR-γ and min-sigma"))
    input_perturbation: float = opt(0.0, lo=0.0, hi=1.0, help=(
        "noise the UNet's input with ε + γ·z while the target keeps ε (Ning et al. 2023, as diffusers' "
        "`train_text_to_image.py`; typical γ = 0.1); at 1 the perturbation is as strong as the noise itself, and "
        "huge values overflow float32 into a NaN loss"))
    max_grad_norm: float | None = opt(None, lo=0.0, lo_open=True, help=(
        "clip the global gradient norm of all trained parameters (after unscaling fp16 gradients) before each "
        "optimizer step; null: no clipping"))
    fused_backward: bool = opt(False, help=(
        "run each parameter's optimizer step during the backward pass as soon as its gradient is complete, and "
        "free the gradient at once (at most one gradient alive). Refused with `grad_accum_steps` > 1, "
        "`max_grad_norm`, fp16 (GradScaler), several processes and `sharding: \"fsdp2\"`"))
    sharding: Literal["none", "fsdp2"] = opt("none", help=(
        "\"none\": every process holds the whole model (DDP when launched on several); \"fsdp2\": the UNet and "
        "trained text encoders are sharded over the processes with PyTorch's FSDP2, each holding 1/N of weights, "
        "gradients, optimizer state and EMA. fsdp2 needs 2+ processes and is refused with `model.full_bf16`, "
        "`fused_backward`, `model.use_torch_compile`, `validation.enabled` and `optimizer.type: \"adafactor\"`"))
    detect_anomaly: bool = opt(False, help=(
        "stop when the loss is NaN or Inf: exit code 3 and a message with the optimizer step, the batch's image "
        "files and the last good trainer state; nothing is saved, so no good weights are overwritten"))
    stop_on_divergence: bool = opt(False, help=(
        "stop (exit 3, without saving) when the logged loss or val/loss diverges: its EMA stays above 3 x its "
        "running minimum for 5 logged values in a row (sdxl_ff/train/divergence.py); off, the run only warns once"))
    lr_warmup_steps: int = opt(0, lo=0, help=(
        "the EMA starts after this many optimizer steps; without an `lr_scheduler` it is also a linear LR warmup "
        "over them, then the constant base rate"))
    lr_scheduler: LRSchedulerConfig | None = opt(None, help=(
        "a learning-rate curve (table `training.lr_scheduler`); null: the warmup of `lr_warmup_steps`, then the "
        "constant base rate"))
    ema_update_every: int = opt(10, lo=1, help=(
        "update the EMA every N optimizer steps, with decay `model.ema_decay`**N"))
    log_every: int = opt(10, lo=1, help="print the mean loss every N optimizer steps")
    checkpoint_every: int | None = opt(None, lo=1, help=(
        "write a checkpoint every N optimizer steps to `<output_dir>/checkpoints/step-NNNNNNN/`; null: none"))
    keep_checkpoints: int | None = opt(None, lo=1, help="keep only the newest N checkpoints; null keeps all")
    resume_from: str | None = opt(None, help=(
        "a Diffusers folder (a checkpoint or a finished output) whose weights are trained further; null: a fresh "
        "run"))
    resume_state_path: str | None = opt(None, help=(
        "the trainer state to continue; null: `<resume_from>/trainer_state.pt`, and if that file is missing only "
        "the weights are continued (fresh optimizer, step 0, with a warning); a path given here must exist. Refused "
        "without `resume_from`"))
    state_path: str = opt("", help="where the trainer state is written; empty: `<output_dir>/trainer_state.pt`")
    tensorboard: TensorBoardConfig = opt(factory=TensorBoardConfig, help=(
        "TensorBoard logging (table `training.tensorboard`)"))


@dataclass
class BucketConfig:
    """Aspect-ratio buckets: each image goes to the resolution whose aspect ratio is closest to its own (compared as
    log(width/height); a tie goes to the one listed first), is scaled to cover it and cropped; a batch holds one
    resolution."""
    enabled: bool = opt(False, help="sort images into aspect-ratio buckets instead of one square size")
    resolutions: list[list[int]] = opt(factory=lambda: [[1024, 1024], [896, 1152], [1152, 896]], help=(
        "`[width, height]` of each bucket: pairs of positive integers divisible by `divisible_by`, none listed "
        "twice"))
    divisible_by: int = opt(64, lo=8, help="every resolution must be divisible by it")
    batch_size: int | None = opt(None, lo=1, help=(
        "the batch size of every bucket, replacing `training.batch_size`; null: `training.batch_size`"))
    drop_last: bool = opt(True, help=(
        "leave each bucket's incomplete last batch out of the epoch (a different one each epoch); a bucket with "
        "fewer images than its batch size is then never seen, and the start-up log warns with their number"))
    per_resolution_batch_sizes: dict[str, int] = opt(factory=dict, help=(
        "`{\"WxH\": n}`: a bucket's own batch size; each key must be one of `resolutions`"))


@dataclass
class LatentCacheConfig:
    """VAE latents cached on disk, so training runs without VAE passes; missing entries are built at start-up."""
    enabled: bool = opt(False, help=(
        "cache the VAE latents on disk and train without VAE passes; refused with `data.random_crop`"))
    cache_dir: str = opt("./cache/latents", help="where the entries are kept (runs may share it)")
    dtype: Literal["auto", "fp16", "bf16", "fp32"] = opt("auto", help=(
        "the entries' dtype; \"auto\": the VAE's compute dtype"))
    build_batch_size: int = opt(2, lo=1, help="images per VAE encode while building the cache")


@dataclass
class TextEmbeddingCacheConfig:
    """Both text encoders' outputs for every caption the run can draw, cached on disk; training then skips the
    encoders. Exact (the same losses as encoding live), and not used, with a log line, when a text encoder is
    trained."""
    enabled: bool = opt(False, help=(
        "cache the frozen text encoders' outputs per caption; the encoders leave the GPU while training"))
    cache_dir: str = opt("./cache/text_embeddings", help="where the entries are kept")
    variants: int = opt(8, lo=1, help=(
        "with shuffled captions: the pre-drawn orders per caption that the cache holds (a shuffle picks one); set "
        "while the cache is off it is unused and logged as a warning"))


@dataclass
class DatasetSourceConfig:
    """One entry of `data.datasets`; a caption key left null takes the top-level `data.*` value."""
    image_dir: str = opt("", help=(
        "the source's folder of images with `.txt` captions (required; it must exist and hold images)"))
    name: str | None = opt(None, help=(
        "shown in the log and by `dataset.py`; names must be distinct; null: the folder's name"))
    repeats: int = opt(1, lo=1, help=(
        "how often each image is seen per epoch, each repeat its own sample with its own crop and caption draw; an "
        "epoch holds at most 10,000,000 samples over all sources"))
    loss_weight: float = opt(1.0, lo=0.0, hi=1000.0, help=(
        "this source's samples' losses are multiplied by it (relative to the other sources; a lower weight makes "
        "regularization images; all weights 0 is refused); above 1000 one source drowns the others, and near "
        "3.4e38 float32 overflows into a NaN loss"))
    masks: bool = opt(False, help=(
        "train with a loss mask per image, `<stem>_mask.png` beside it (white = train, black = ignore); a missing "
        "mask, or one whose size differs from its image's, is refused"))
    mask_from_alpha: bool = opt(False, help=(
        "with `masks`, take the mask from the image's alpha channel instead (refused without `masks`, and for an "
        "image without alpha)"))
    caption_prefix: str | None = opt(None, help="this source's `data.caption_prefix`; null: the top-level value")
    caption_dropout_prob: float | None = opt(None, lo=0.0, hi=1.0, help=(
        "this source's `data.caption_dropout_prob`; null: the top-level value"))
    caption_shuffle_prob: float | None = opt(None, lo=0.0, hi=1.0, help=(
        "this source's `data.caption_shuffle_prob`; null: the top-level value"))
    caption_shuffle_separator: str | None = opt(None, help=(
        "this source's `data.caption_shuffle_separator`; null: the top-level value"))
    caption_shuffle_min_tokens: int | None = opt(None, lo=0, help=(
        "this source's `data.caption_shuffle_min_tokens`; null: the top-level value"))
    caption_keep_tokens: int | None = opt(None, lo=0, help=(
        "this source's `data.caption_keep_tokens`; null: the top-level value"))


@dataclass
class DataConfig:
    """The training images and captions, their augmentation, buckets and caches."""
    image_dir: str | None = opt(None, help=(  # "data/images" when data.datasets is empty (resolve_paths)
        "the folder of training images with `.txt` captions; null: `data/images` when `datasets` is empty. Set "
        "this or `datasets`"))
    datasets: list[DatasetSourceConfig] = opt(factory=list, help=(
        "several sources instead of `image_dir` (table `data.datasets[]`), each with its own repeats, loss weight, "
        "masks and caption settings"))
    caption_prefix: str = opt("", help=(
        "fixed text put before every (augmented) caption, joined like shuffled parts; it never moves in a shuffle "
        "and is dropped with the caption by dropout"))
    image_index_path: str = opt("./cache/image_index.json", help=(
        "each image's size by path, file size and mtime, so a second start-up opens no image (with the latent cache "
        "on, it reads each header to check the entry); \"\" turns it off"))
    size: int = opt(1024, lo=64, help="without buckets: the longest side's limit in pixels")
    skip_bad_images: bool = opt(False, help=(
        "skip unreadable or uncaptioned files with a warning instead of stopping"))
    max_image_pixels: int | None = opt(178956970, lo=1, help=(  # PIL's decompression-bomb limit
        "the largest image (width × height) read, PIL's decompression-bomb limit; a larger one is an error naming "
        "it; null: no limit"))
    caption_dropout_prob: float = opt(0.0, lo=0.0, hi=1.0, help=(
        "probability that a sample's caption becomes \"\" (which teaches classifier-free guidance)"))
    caption_shuffle_prob: float = opt(0.0, lo=0.0, hi=1.0, help="probability that a caption's parts are shuffled")
    caption_shuffle_separator: str = opt(",", help="what splits a caption into parts; must not be empty when shuffling")
    caption_shuffle_min_tokens: int = opt(0, lo=0, help="shuffle only captions with at least this many parts")
    caption_keep_tokens: int = opt(0, lo=0, help="the first N parts of a caption never move when shuffling")
    random_crop: bool = opt(False, help=(
        "crop at a random position (new each epoch) instead of the centre; refused with the latent cache"))
    num_workers: int = opt(0, lo=0, help=(
        "DataLoader worker processes, kept alive across epochs (pinned memory on CUDA, not under WSL2); the same "
        "seed gives the same batches whatever the number"))
    bucket: BucketConfig = opt(factory=BucketConfig, help="aspect-ratio buckets (table `data.bucket`)")
    latent_cache: LatentCacheConfig = opt(factory=LatentCacheConfig, help=(
        "the VAE latent cache (table `data.latent_cache`)"))
    text_embedding_cache: TextEmbeddingCacheConfig = opt(factory=TextEmbeddingCacheConfig, help=(
        "the text-embedding cache (table `data.text_embedding_cache`)"))


@dataclass
class OptimizerConfig:
    """The optimizer; UNet, text encoder 1 and text encoder 2 are its parameter groups, each with its own rate."""
    type: Literal["adamw8bit", "adamw", "adafactor"] = opt("adamw8bit", help=(
        "\"adamw8bit\": 8-bit state for tensors of 4096+ elements: bitsandbytes' for fp32 weights (without its "
        "per-tensor GPU wait), torchao's with `model.full_bf16` and under `training.sharding: \"fsdp2\"`; "
        "\"adamw\": torch's (fused on CUDA), torchao's with `model.full_bf16`; \"adafactor\": transformers' "
        "Adafactor with relative_step, scale_parameter and warmup_init off, so the configured rates and schedule "
        "drive it (the smallest state; refused under fsdp2). A trainer state only resumes into the type and "
        "implementation that wrote it"))
    weight_decay: float = opt(1e-2, lo=0.0, help=(
        "decoupled weight decay (AdamW, and Adafactor too); weight_decay × each trained module's learning rate must "
        "stay below 1, else it zeroes or flips the weights"))
    betas: list[float] = opt(factory=lambda: [0.9, 0.999], help=(
        "AdamW's (β1, β2): two numbers in [0, 1); other than the default refused with \"adafactor\""))
    eps: float = opt(1e-8, lo=1e-30, hi=1.0, help=(
        "AdamW's ε in m / (√v + ε); other than the default refused with \"adafactor\". Below 1e-30 it is no normal "
        "float32 number (and 0 makes 0/0 = NaN for a weight with no gradient); above 1 it outweighs any real "
        "gradient's RMS and the updates vanish"))


# the single file's suffix by format, as ComfyUI and A1111 read it: .safetensors/.sft as safetensors, else torch.load
CHECKPOINT_SUFFIXES = {"safetensors": (".safetensors", ".sft"), "pickle": (".ckpt", ".pt", ".pth", ".bin")}


@dataclass
class ExportConfig:
    """The single-file checkpoint for ComfyUI, A1111 and Forge, converted from the Diffusers folder after
    training."""
    save_single_file: bool = opt(False, help=(
        "after training, write one ComfyUI/A1111 checkpoint from the Diffusers folder"))
    checkpoint_path: str = opt("", help=(
        "where it goes; empty: `{run.checkpoint_root}/{run.name}.safetensors` (`.ckpt` when `use_safetensors` is "
        "false). Refused at start-up with a suffix that does not match `use_safetensors`, inside "
        "`training.output_dir`, or when it exists on a fresh run without `--overwrite`"))
    converter_script: str = opt("./converttosdxl.py", help=(
        "run as a separate process with the trainer's Python; a relative path is looked up in the working "
        "directory, then the repository. Missing: refused at start-up. Failing: an error after training; the "
        "Diffusers folder stays and the log shows the command to retry"))
    half_precision: bool = opt(True, help="store fp16 weights (`--half`)")
    use_safetensors: bool = opt(True, help=(
        "the format: true writes safetensors (`--use_safetensors`; `checkpoint_path` ends in `.safetensors` or "
        "`.sft`), false a pickled checkpoint (`--no-safetensors` to the bundled converter, no flag to a custom "
        "one; `.ckpt`, `.pt`, `.pth` or `.bin`)"))
    extra_args: list[str] = opt(factory=list, help="further arguments appended to the converter's command line")


@dataclass
class EvalPhaseConfig:
    """When eval images are rendered: `eval.live` during training into `<output_dir>/eval/live/step_<step>/`,
    `eval.final` once after the last step into `<output_dir>/eval/final/`."""
    enabled: bool = opt(False, help="render this phase's eval images")
    every_n_steps: int | None = opt(None, lo=1, help=(
        "live: every N optimizer steps, required when enabled; final: refused (the final eval runs once)"))
    max_batches: int | None = opt(None, lo=1, help="render only the first N prompts; null: all")


@dataclass
class EvalConfig:
    """Eval images from fixed prompts during and after training, sampled as ComfyUI would."""
    backend: Literal["diffusers", "kdiffusion"] = opt("diffusers", help=(
        "\"diffusers\": StableDiffusionXLPipeline with a mapped scheduler; \"kdiffusion\": the k-diffusion "
        "package's samplers on ComfyUI's sigmas"))
    sampler_name: str = opt("euler", help=(
        "a ComfyUI sampler name (e.g. `dpmpp_2m_sde_heun`, on both backends); an unknown one is refused listing the "
        "backend's names"))
    scheduler: str = opt("normal", help=(
        "a ComfyUI scheduler name (`normal`, `karras`, `exponential`, `sgm_uniform`, `simple`, `ddim_uniform`, "
        "`beta`, `linear_quadratic`, `kl_optimal`), a shortcut `euler` / `lms` (that sampler on the `normal` "
        "schedule, both backends) or, with `diffusers`, a diffusers scheduler class name"))
    num_inference_steps: int = opt(30, lo=1, help="sampling steps per image")
    cfg_scale: float = opt(7.0, lo=0.0, hi=100.0, help=(
        "classifier-free guidance scale of the eval images (ComfyUI's KSampler allows 0-100)"))
    prompts_path: str = opt("data/eval_prompts.example.json", help=(
        "a JSON list of `{prompt, negative_prompt, seed, height, width}` (or `resolution`/`size` \"WxH\"); checked "
        "at start-up"))
    height: int = opt(1024, lo=64, help="the height of prompts without their own; a multiple of 8")
    width: int = opt(1024, lo=64, help="the width of prompts without their own; a multiple of 8")
    use_ema: bool = opt(False, help=(
        "sample with the EMA weights (swapped in for the eval, swapped back bit-exact); needs `model.use_ema`"))
    empty_negative: Literal["zeros", "encoded"] | None = opt(None, help=(
        "a prompt without a negative gets \"zeros\" (the diffusers pipeline's zeroed negative) or \"encoded\" "
        "(ComfyUI's encoded \"\"); null: zeros on diffusers, encoded on kdiffusion"))
    live: EvalPhaseConfig = opt(factory=EvalPhaseConfig, help="evals during training (table `eval.live`)")
    final: EvalPhaseConfig = opt(factory=EvalPhaseConfig, help="the eval after the last step (table `eval.final`)")


@dataclass
class ValidationConfig:
    """A deterministic validation loss on held-out images: the same images, timesteps and noise every time."""
    enabled: bool = opt(False, help=(
        "compute the validation loss; the switch: while it is off the keys below may stay in the config and change "
        "nothing (no image is held out). Refused with `training.sharding: \"fsdp2\"`"))
    image_dir: str | None = opt(None, help=(
        "a folder of held-out images with `.txt` captions, none of them a training image; set exactly one of "
        "`image_dir` and `split`"))
    split: float | None = opt(None, lo=0.0, hi=1.0, lo_open=True, hi_open=True, help=(
        "instead: this fraction of `data.image_dir` (or of each `data.datasets` source; sources that share images "
        "are refused) is held out of training, chosen by `seed`; at least 1 image held out and 1 left to train on"))
    every_n_steps: int | None = opt(None, lo=1, help=(
        "evaluate every N optimizer steps (also before the first step of a fresh run and after the last); required "
        "when enabled"))
    timesteps: list[int] = opt(factory=lambda: [100, 300, 500, 700, 900], help=(
        "the timesteps every image is evaluated at: distinct, >= 0 and below the scheduler's number (1000 for "
        "SDXL), checked before the model loads"))
    seed: int = opt(0, lo=0, hi=2**32, hi_open=True, help=(
        "seeds the split and the validation noise (never the training's randomness)"))


@dataclass
class Config:
    """The sections of a config file, and the device."""
    device: Literal["auto", "cuda", "cpu"] = opt("auto", help=(
        "\"auto\": CUDA if available, else the CPU; \"cuda\": CUDA, an error if there is none; \"cpu\""))
    model: ModelConfig = opt(factory=ModelConfig, help="the model and how it is held (table `model`)")
    run: RunConfig = opt(factory=RunConfig, help="the run's name and output folders (table `run`)")
    training: TrainingConfig = opt(factory=TrainingConfig, help=(
        "length, rates, objective, checkpoints and resume (table `training`)"))
    data: DataConfig = opt(factory=DataConfig, help="images, captions, buckets and caches (table `data`)")
    optimizer: OptimizerConfig = opt(factory=OptimizerConfig, help="the optimizer (table `optimizer`)")
    export: ExportConfig = opt(factory=ExportConfig, help="the single-file checkpoint (table `export`)")
    eval: EvalConfig = opt(factory=EvalConfig, help="eval images (table `eval`)")
    validation: ValidationConfig = opt(factory=ValidationConfig, help="the validation loss (table `validation`)")
    source: str = field(default="<defaults>", metadata={"internal": True})
    resume_state_explicit: bool = field(default=False, metadata={"internal": True})
    overrides: tuple[str, ...] = field(default=(), metadata={"internal": True})  # the --set arguments, for hints
    # dotted paths of the keys the config file or a --set wrote (sections too): model.memory_mode "auto" keeps them
    explicit: frozenset[str] = field(default=frozenset(), metadata={"internal": True})

    def is_explicit(self, key: str) -> bool:
        """Whether `key` (e.g. "training.batch_size") was written in the config file or given with --set."""
        return key in self.explicit

"""The configuration's schema: every section and key declared once, with its type, default and limits.

Loading, validation, `--set` overrides and the derived paths (config.py) all follow from these declarations;
cross-key rules live in config_rules.py. This module imports nothing of the package, so any module may take
its section types from here without an import cycle.
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
    inv_gamma: float = opt(1.0, lo=0.0, lo_open=True)
    power: float = opt(2 / 3, lo=0.0, lo_open=True)


@dataclass
class ModelConfig:
    id: str = "stabilityai/stable-diffusion-xl-base-1.0"
    revision: str | None = None
    variant: str | None = None
    config_dir: str | None = None
    use_ema: bool = False
    ema_decay: float = opt(0.9999, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    use_bf16: bool = True
    use_gradient_checkpointing: bool = False
    full_bf16: bool = False
    train_text_encoder_1: bool = True
    train_text_encoder_2: bool = False
    use_torch_compile: bool = False
    torch_compile_kwargs: dict = opt(factory=dict)
    ema_on_cpu: bool = False
    allow_tf32: bool = True
    channels_last: bool = False
    cudnn_benchmark: bool | Literal["auto"] = "auto"
    ema_warmup: EMAWarmupConfig | None = None


@dataclass
class RunConfig:
    name: str = ""
    output_root: str = ".output"
    checkpoint_root: str = ""


@dataclass
class LRSchedulerConfig:
    type: Literal["constant", "linear_decay", "cosine_decay", "cosine_restarts"] = "constant"
    warmup_steps: int = opt(0, lo=0)
    min_factor: float = opt(0.0, lo=0.0, hi=1.0)
    cycle_steps: int | None = opt(None, lo=1)
    cycle_mult: float = opt(1.0, lo=1.0, hi=100.0, help=(
        "cosine_restarts: each cycle is this many times longer than the one before (SGDR uses 2); at 100 the second "
        "cycle is already 100 cycles long, and far larger values overflow the cycle arithmetic"))


@dataclass
class TensorBoardConfig:
    enabled: bool = False
    base_dir: str = "./logs/tensorboard"
    log_dir: str = ""
    log_grad_norm: bool = True
    log_scaler: bool = True


@dataclass
class TrainingConfig:
    output_dir: str = ""
    num_steps: int | None = opt(None, lo=1)
    num_epochs: int | None = opt(None, lo=1)
    lr_unet: float = opt(1e-5, lo=0.0)
    lr_text_encoder_1: float | None = opt(None, lo=0.0)
    lr_text_encoder_2: float | None = opt(None, lo=0.0)
    seed: int | None = opt(None, lo=0, hi=2**32, hi_open=True)  # torch and numpy seeds are 32/64-bit
    batch_size: int = opt(1, lo=1)
    grad_accum_steps: int = opt(1, lo=1)
    noise_offset: float = opt(0.0, lo=0.0, hi=1.0, help=(
        "offset noise: each (sample, channel) gets a constant offset·z added to its unit-variance noise (published "
        "values 0.03-0.1); at 1 the offset is as strong as the noise itself, and huge values overflow float32 into a "
        "NaN loss"))
    min_sigma: float | None = opt(None, lo=1e-4, hi=100.0, help=(
        "weight every timestep as if its noise level σ were at least min_sigma (SNR clamped at 1/min_sigma²). "
        "SDXL's σ runs from 0.029 (t = 0) to 14.6 (t = 999): below 1e-4 nothing is clamped, above 100 everything "
        "is, and beyond those 1/min_sigma² leaves float range (a zero loss, or a crash)"))
    min_sigma_warmup_steps: int = opt(0, lo=0, help=(
        "optimizer steps trained without min_sigma before it takes effect; needs training.min_sigma"))
    prediction_type: Literal["epsilon", "v_prediction"] | None = None
    zero_terminal_snr: bool = False
    snr_gamma: float | None = opt(None, lo=1e-4, hi=1e4, help=(
        "Min-SNR-γ loss weighting (γ = 5 in the paper). SDXL's SNR runs from 0.0047 (t = 999) to 1,175 (t = 0), so "
        "γ beyond [1e-4, 1e4] acts as that end of the range does; a γ below float32's range (1e-45) would zero the "
        "loss"))
    timestep_sampling: Literal["uniform", "logit_normal", "mode"] = "uniform"
    logit_mean: float = opt(0.0, lo=-10.0, hi=10.0, help=(
        "logit_normal timestep sampling: the mean of the normal whose sigmoid is the noise fraction (SD3: 0). At "
        "|mean| = 10 nearly every draw is already the first or last timestep"))
    logit_std: float = opt(1.0, lo=0.0, hi=10.0, lo_open=True, help=(
        "logit_normal timestep sampling: the standard deviation of that normal (SD3: 1). At 10 most draws already "
        "land within 7 timesteps of either end"))
    mode_scale: float = opt(1.29, lo=-1.0, hi=2 / (3.141592653589793 - 2))  # SD3: monotone density in [-1, 2/(π-2)]
    min_timestep: int = opt(0, lo=0)
    max_timestep: int | None = opt(None, lo=1)
    timestep_shift: float | Literal["resolution"] | None = opt(None, lo=0.0, hi=1000.0, lo_open=True, help=(
        "SD3's timestep shift s (u -> s·u / (1 + (s - 1)·u)), or \"resolution\" for s = √(pixels / 1024²). At "
        "s = 1000 the median timestep is already 999 of 1000; near 3.4e38 s overflows float32 and draws t = 0"))
    loss_type: Literal["mse", "l1", "huber", "smooth_l1"] = "mse"
    huber_c: float | None = opt(None, lo=1e-4, hi=1.0, help=(
        "huber / smooth_l1: the residual at which the loss turns from quadratic to linear (sd-scripts: 0.1). Below "
        "1e-4 the loss is nearly c·|d|, its gradients shrinking toward Adam's eps (1e-8); below float32's range "
        "(1e-45) c, and the loss, become 0"))
    huber_schedule: Literal["constant", "exponential", "snr"] | None = None
    debiased_estimation: bool = False
    input_perturbation: float = opt(0.0, lo=0.0, hi=1.0, help=(
        "noise the input with ε + γ·z while the target keeps ε (Ning et al. 2023 use γ = 0.1); at 1 the perturbation "
        "is as strong as the noise itself, and huge values overflow float32 into a NaN loss"))
    max_grad_norm: float | None = opt(None, lo=0.0, lo_open=True)
    fused_backward: bool = False
    sharding: Literal["none", "fsdp2"] = "none"
    detect_anomaly: bool = False
    stop_on_divergence: bool = opt(False, help=(
        "stop (exit 3, without saving) when the logged loss or val/loss diverges: its EMA stays above 3 x its "
        "running minimum for 5 logged values in a row (sdxl_ff/divergence.py); off, the run only warns once"))
    lr_warmup_steps: int = opt(0, lo=0)
    lr_scheduler: LRSchedulerConfig | None = None
    ema_update_every: int = opt(10, lo=1)
    log_every: int = opt(10, lo=1)
    checkpoint_every: int | None = opt(None, lo=1)
    keep_checkpoints: int | None = opt(None, lo=1)
    resume_from: str | None = opt(None)
    resume_state_path: str | None = opt(None)
    state_path: str = ""
    tensorboard: TensorBoardConfig = opt(factory=TensorBoardConfig)


@dataclass
class BucketConfig:
    enabled: bool = False
    resolutions: list[list[int]] = opt(factory=lambda: [[1024, 1024], [896, 1152], [1152, 896]])
    divisible_by: int = opt(64, lo=8)
    batch_size: int | None = opt(None, lo=1)
    drop_last: bool = True
    per_resolution_batch_sizes: dict[str, int] = opt(factory=dict)


@dataclass
class LatentCacheConfig:
    enabled: bool = False
    cache_dir: str = "./cache/latents"
    dtype: Literal["auto", "fp16", "bf16", "fp32"] = "auto"
    build_batch_size: int = opt(2, lo=1)


@dataclass
class TextEmbeddingCacheConfig:
    enabled: bool = False
    cache_dir: str = "./cache/text_embeddings"
    variants: int = opt(8, lo=1)


@dataclass
class DatasetSourceConfig:
    """One entry of `data.datasets`; a caption key left null takes the top-level `data.*` value."""
    image_dir: str = ""
    name: str | None = None
    repeats: int = opt(1, lo=1)
    loss_weight: float = opt(1.0, lo=0.0, hi=1000.0, help=(
        "this source's samples' losses are multiplied by it (relative to the other sources); above 1000 one source "
        "drowns the others, and near 3.4e38 float32 overflows into a NaN loss"))
    masks: bool = False
    mask_from_alpha: bool = False
    caption_prefix: str | None = None
    caption_dropout_prob: float | None = opt(None, lo=0.0, hi=1.0)
    caption_shuffle_prob: float | None = opt(None, lo=0.0, hi=1.0)
    caption_shuffle_separator: str | None = None
    caption_shuffle_min_tokens: int | None = opt(None, lo=0)
    caption_keep_tokens: int | None = opt(None, lo=0)


@dataclass
class DataConfig:
    image_dir: str | None = None  # "data/images" when data.datasets is empty (resolve_paths)
    datasets: list[DatasetSourceConfig] = opt(factory=list)
    caption_prefix: str = ""
    image_index_path: str = "./cache/image_index.json"
    size: int = opt(1024, lo=64)
    skip_bad_images: bool = False
    max_image_pixels: int | None = opt(178956970, lo=1)  # PIL's decompression-bomb limit; null: none
    caption_dropout_prob: float = opt(0.0, lo=0.0, hi=1.0)
    caption_shuffle_prob: float = opt(0.0, lo=0.0, hi=1.0)
    caption_shuffle_separator: str = ","
    caption_shuffle_min_tokens: int = opt(0, lo=0)
    caption_keep_tokens: int = opt(0, lo=0)
    random_crop: bool = False
    num_workers: int = opt(0, lo=0)
    bucket: BucketConfig = opt(factory=BucketConfig)
    latent_cache: LatentCacheConfig = opt(factory=LatentCacheConfig)
    text_embedding_cache: TextEmbeddingCacheConfig = opt(factory=TextEmbeddingCacheConfig)


@dataclass
class OptimizerConfig:
    type: Literal["adamw8bit", "adamw", "adafactor"] = "adamw8bit"
    weight_decay: float = opt(1e-2, lo=0.0)
    betas: list[float] = opt(factory=lambda: [0.9, 0.999])
    eps: float = opt(1e-8, lo=1e-30, hi=1.0, help=(
        "AdamW's ε in m / (√v + ε). Below 1e-30 it is no normal float32 number (and 0 makes 0/0 = NaN for a weight "
        "with no gradient); above 1 it outweighs any real gradient's RMS and the updates vanish"))


# the single file's suffix by format, as ComfyUI and A1111 read it: .safetensors/.sft as safetensors, else torch.load
CHECKPOINT_SUFFIXES = {"safetensors": (".safetensors", ".sft"), "pickle": (".ckpt", ".pt", ".pth", ".bin")}


@dataclass
class ExportConfig:
    save_single_file: bool = False
    checkpoint_path: str = ""
    converter_script: str = "./converttosdxl.py"
    half_precision: bool = True
    use_safetensors: bool = True
    extra_args: list[str] = opt(factory=list)


@dataclass
class EvalPhaseConfig:
    enabled: bool = False
    every_n_steps: int | None = opt(None, lo=1)
    max_batches: int | None = opt(None, lo=1)


@dataclass
class EvalConfig:
    backend: Literal["diffusers", "kdiffusion"] = "diffusers"
    sampler_name: str = "euler"
    scheduler: str = "normal"
    num_inference_steps: int = opt(30, lo=1)
    cfg_scale: float = opt(7.0, lo=0.0, hi=100.0, help=(
        "classifier-free guidance scale of the eval images (ComfyUI's KSampler allows 0-100)"))
    prompts_path: str = "data/eval_prompts.example.json"
    height: int = opt(1024, lo=64)
    width: int = opt(1024, lo=64)
    use_ema: bool = False
    empty_negative: Literal["zeros", "encoded"] | None = None  # null: zeros on diffusers, encoded on kdiffusion
    live: EvalPhaseConfig = opt(factory=EvalPhaseConfig)
    final: EvalPhaseConfig = opt(factory=EvalPhaseConfig)


@dataclass
class ValidationConfig:
    enabled: bool = False
    image_dir: str | None = None
    split: float | None = opt(None, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    every_n_steps: int | None = opt(None, lo=1)
    timesteps: list[int] = opt(factory=lambda: [100, 300, 500, 700, 900])
    seed: int = opt(0, lo=0, hi=2**32, hi_open=True)


@dataclass
class Config:
    device: Literal["auto", "cuda", "cpu"] = "auto"
    model: ModelConfig = opt(factory=ModelConfig)
    run: RunConfig = opt(factory=RunConfig)
    training: TrainingConfig = opt(factory=TrainingConfig)
    data: DataConfig = opt(factory=DataConfig)
    optimizer: OptimizerConfig = opt(factory=OptimizerConfig)
    export: ExportConfig = opt(factory=ExportConfig)
    eval: EvalConfig = opt(factory=EvalConfig)
    validation: ValidationConfig = opt(factory=ValidationConfig)
    source: str = field(default="<defaults>", metadata={"internal": True})
    resume_state_explicit: bool = field(default=False, metadata={"internal": True})
    overrides: tuple[str, ...] = field(default=(), metadata={"internal": True})  # the --set arguments, for hints

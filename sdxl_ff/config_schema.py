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
        factory: Any = None) -> Any:
    """Declare a config field with optional numeric bounds.

    `pending` names the issue that will implement the key: until then any value
    other than the default is refused instead of being silently ignored.
    """
    meta = {"lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open, "pending": pending}
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
    cycle_mult: float = opt(1.0, lo=1.0)


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
    noise_offset: float = opt(0.0, lo=0.0)
    min_sigma: float | None = opt(None, lo=0.0, lo_open=True)
    min_sigma_warmup_steps: int = opt(0, lo=0)
    prediction_type: Literal["epsilon", "v_prediction"] | None = None
    zero_terminal_snr: bool = False
    snr_gamma: float | None = opt(None, lo=0.0, lo_open=True)
    timestep_sampling: Literal["uniform", "logit_normal", "mode"] = "uniform"
    logit_mean: float = 0.0
    logit_std: float = opt(1.0, lo=0.0, lo_open=True)
    mode_scale: float = opt(1.29, lo=-1.0, hi=2 / (3.141592653589793 - 2))  # SD3: monotone density in [-1, 2/(π-2)]
    min_timestep: int = opt(0, lo=0)
    max_timestep: int | None = opt(None, lo=1)
    timestep_shift: float | Literal["resolution"] | None = opt(None, lo=0.0, lo_open=True)
    loss_type: Literal["mse", "l1", "huber", "smooth_l1"] = "mse"
    huber_c: float | None = opt(None, lo=0.0, hi=1.0, lo_open=True)
    huber_schedule: Literal["constant", "exponential", "snr"] | None = None
    debiased_estimation: bool = False
    input_perturbation: float = opt(0.0, lo=0.0)
    max_grad_norm: float | None = opt(None, lo=0.0, lo_open=True)
    fused_backward: bool = False
    sharding: Literal["none", "fsdp2"] = "none"
    detect_anomaly: bool = False
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
    loss_weight: float = opt(1.0, lo=0.0)
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
    eps: float = opt(1e-8, lo=0.0, lo_open=True)


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
    cfg_scale: float = opt(7.0, lo=0.0)
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

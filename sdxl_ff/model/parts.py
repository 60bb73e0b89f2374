"""Loading the parts of an SDXL pipeline, and the tiny offline SDXL used by the quickstart and tests.

`model.id` is a hub id, a local Diffusers folder, a single-file SDXL checkpoint (`.safetensors` /
`.ckpt`, as ComfyUI and A1111 use), or `builtin:tiny-sdxl`. The tiny model has
SDXL's exact architecture (two CLIP encoders with the bigG-style projection, `text_time`
conditioning, a 4-level VAE, SDXL's noise schedule) with small widths, built in code from a seed.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from sdxl_ff.config.errors import ConfigError
from sdxl_ff.config.rules import SINGLE_FILE_SUFFIXES
from sdxl_ff.config.schema import Config
from sdxl_ff.model.weight_check import SHOWN, header_shapes, mismatch_message, shape_problems

log = logging.getLogger(__name__)

TINY_ID = "builtin:tiny-sdxl"
SDXL_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                     beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading",
                     prediction_type="epsilon", interpolation_type="linear", use_karras_sigmas=False)
# Words the tiny tokenizers merge into single tokens; anything else falls back to bytes.
TINY_WORDS = ("a an the on of in with and background circle square triangle ring cross "
              "red green blue yellow white black orange purple cyan magenta gray pink small large").split()


@dataclass
class SDXLParts:
    """Everything training needs from an SDXL checkpoint."""
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    text_encoder_2: CLIPTextModelWithProjection
    tokenizer: CLIPTokenizer
    tokenizer_2: CLIPTokenizer
    scheduler: EulerDiscreteScheduler  # the inference scheduler saved with the pipeline

    def noise_scheduler(self) -> DDPMScheduler:
        """The training-time scheduler, with the same betas and prediction type."""
        return DDPMScheduler.from_config(self.scheduler.config)


# --------------------------------------------------------------------------- tiny SDXL

def vae_precision(vae: AutoencoderKL) -> contextlib.AbstractContextManager:
    """Run an fp32 VAE in fp32 even inside fp16 autocast: SDXL's VAE overflows fp16 (NaN latents, black images)."""
    if vae.dtype == torch.float32:
        return torch.autocast(vae.device.type, enabled=False)
    return contextlib.nullcontext()


def _byte_alphabet() -> list[str]:
    """CLIP's byte-to-unicode table, in CLIP's vocabulary order ('!' first)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def tiny_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """A CLIP-format byte-level BPE tokenizer whose merges spell TINY_WORDS as single tokens."""
    alphabet = _byte_alphabet()
    vocab = alphabet + [c + "</w>" for c in alphabet]
    known = set(vocab)
    merges: list[tuple[str, str]] = []
    for word in sorted(set(TINY_WORDS)):
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        current = symbols[0]
        for symbol in symbols[1:]:
            if current + symbol not in known:
                merges.append((current, symbol))
                vocab.append(current + symbol)
                known.add(current + symbol)
            current += symbol
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges,
                         model_max_length=77, pad_token=pad_token)


def build_tiny_sdxl(seed: int = 0) -> SDXLParts:
    """Build the tiny SDXL deterministically from `seed` (< 0.5 s, no files, no network)."""
    tokenizer = tiny_tokenizer()
    tokenizer_2 = tiny_tokenizer(pad_token="!")  # SDXL's second tokenizer pads with "!" (id 0)
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
               max_position_embeddings=77)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        hidden_act="quick_gelu", projection_dim=32, **ids))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        hidden_act="gelu", projection_dim=32, **ids))
    time_embed_dim = 8
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64), layers_per_block=2,
        transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 4),
        cross_attention_dim=32 + 64, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=32 + 6 * time_embed_dim, norm_num_groups=8)
    vae = load_tiny_vae()
    scheduler = EulerDiscreteScheduler(**SDXL_SCHEDULE)
    return SDXLParts(unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, scheduler)


# The tiny VAE is trained (tools/train_tiny_vae.py), not random: a random VAE decodes everything a tiny UNet
# learns into coloured static. norm_num_groups=1 because GroupNorm with 8 groups over 8-16 channels is nearly a
# per-channel instance norm, which erases flat colours (FACTS.md: stalls near 12 dB). The committed weights
# reconstruct 256 unseen 128 px scenes at 21.8 dB, images like the samples at 26.2 dB (train_tiny_vae.quality).
TINY_VAE_LAYOUT = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=128,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=1)
TINY_VAE_FILE = Path(__file__).with_name("assets") / "tiny_vae.safetensors"
# Both printed by tools/train_tiny_vae.py; the scaling factor is 1/std of the VAE's latents on fresh shapes.
TINY_VAE_SHA256 = "7de87f84af849bb98700a2c653888aa0850bc4c1f081fa79810b42b6f5c5994d"
TINY_VAE_SCALING_FACTOR = 0.61521


class TinyVAEError(RuntimeError):
    """The committed tiny-VAE weights are missing or not the ones this code was released with."""


def load_tiny_vae(path: Path = TINY_VAE_FILE, sha256: str = TINY_VAE_SHA256) -> AutoencoderKL:
    """The trained tiny VAE from its committed safetensors, checked against its sha256."""
    import hashlib

    from safetensors.torch import load

    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise TinyVAEError(f"{TINY_ID}: cannot read its VAE weights {path} ({e}); reinstall sdxl-ff or "
                           f"run `python tools/train_tiny_vae.py` to rebuild them") from e
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise TinyVAEError(f"{TINY_ID}: {path} has sha256 {digest}, expected {sha256}: the file is damaged or "
                           f"from another version; restore it with `git checkout -- {path.name}` in its folder "
                           f"(or retrain it with tools/train_tiny_vae.py and update TINY_VAE_SHA256)")
    vae = AutoencoderKL(**TINY_VAE_LAYOUT, scaling_factor=TINY_VAE_SCALING_FACTOR)
    vae.load_state_dict(load(data), strict=True)
    return vae


# --------------------------------------------------------------------------- loading

def load_parts(model_id: str, *, revision: str | None = None, variant: str | None = None,
               seed: int = 0, config_dir: str | None = None, key: str = "model.id") -> SDXLParts:
    """Load the SDXL parts named by `model.id` (or `key`, e.g. training.resume_from); raise ConfigError with a
    remedy when impossible."""
    if model_id == TINY_ID:
        return build_tiny_sdxl(seed)
    check_model_id(model_id)
    path = Path(model_id).expanduser()
    local = path.is_dir()
    if path.is_file() and path.suffix in SINGLE_FILE_SUFFIXES:
        return load_single_file(path, config_dir)
    if not local and (path.suffix in SINGLE_FILE_SUFFIXES or model_id.startswith((".", "/", "~"))):
        raise ConfigError(f"model.id: {model_id!r} does not exist; give a Diffusers folder, a single-file "
                          f"SDXL checkpoint (.safetensors/.ckpt), a hub id, or {TINY_ID!r}")
    if local:
        missing = [p for p in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer",
                               "tokenizer_2", "scheduler") if not (path / p).is_dir()]
        if missing:
            raise ConfigError(f"model.id: {model_id!r} is not an SDXL Diffusers folder: missing "
                              f"{', '.join(missing)}/ (an SDXL folder has unet, vae, two text encoders, "
                              f"two tokenizers and a scheduler)")
    source = str(path) if local else model_id
    kw = dict(revision=revision, local_files_only=local or _offline())
    try:
        weights = {name: load_weights(cls, source, name, variant, path / name if local else None, key, **kw)
                   for name, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL),
                                     ("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection))}
        return SDXLParts(
            **weights,
            tokenizer=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kw),
            tokenizer_2=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", **kw),
            scheduler=EulerDiscreteScheduler.from_pretrained(source, subfolder="scheduler", **kw),
        )
    except ConfigError:
        raise
    except (OSError, ValueError) as e:
        if local:
            raise ConfigError(f"model.id: could not load the SDXL folder {model_id!r}: {e}") from e
        raise ConfigError(
            f"model.id: {model_id!r} is not a local folder and could not be loaded from the Hugging Face "
            f"hub or its cache ({type(e).__name__}: {str(e).splitlines()[0]}). On a machine with internet, "
            f"run `huggingface-cli download {model_id}` first, or set model.id to a local Diffusers folder."
        ) from e


def load_weights(cls, source: str, component: str, variant: str | None, folder: Path | None, key: str, **kw):
    """One component through its library's from_pretrained, refused with the mismatched tensors named when its
    weights do not fit its config.json: diffusers would leave the missing ones on the meta device (a crash at the
    first .to()), transformers would initialise them at random (a wrong model, no error)."""
    try:
        model, info = cls.from_pretrained(source, subfolder=component, variant=variant, output_loading_info=True, **kw)
    except (ValueError, RuntimeError) as e:  # a shape mismatch: diffusers raises ValueError, transformers RuntimeError
        if folder is not None and (problems := _weight_problems(component, folder, variant)):
            raise ConfigError(_mismatch(key, folder, problems)) from e
        raise
    missing, wrong = sorted(info["missing_keys"]), sorted(info["mismatched_keys"])
    if missing or wrong:
        problems = (_weight_problems(component, folder, variant) if folder is not None else []) or \
            [f"missing {k}" for k in missing[:SHOWN]] + [f"{k} has another shape" for k in wrong[:SHOWN]]
        raise ConfigError(_mismatch(key, folder or Path(source) / component, problems))
    if info["unexpected_keys"]:
        log.warning("%s: %s/%s holds %d tensor(s) its config has no place for (ignored), e.g. %s", key, source,
                    component, len(info["unexpected_keys"]), ", ".join(sorted(info["unexpected_keys"])[:SHOWN]))
    return model


def _weight_problems(component: str, folder: Path, variant: str | None) -> list[str]:
    """The converter's check (weight_check.py) on the file headers; [] when it finds nothing to name."""
    from sdxl_ff.model.weight_check import ExportError, weight_files
    try:
        return shape_problems(component, folder, header_shapes(weight_files(folder, variant)))
    except (ExportError, OSError, ValueError) as e:  # no weights at all, unreadable headers: that is the problem
        return [str(e)]


def _mismatch(key: str, folder: Path, problems: list[str]) -> str:
    from sdxl_ff.model.weight_check import PREFIX
    layout = any(p.startswith(f"unexpected {prefix}") for p in problems for prefix in PREFIX.values())
    hint = (" (its tensors are named as in a single-file SDXL checkpoint: was a converter's output written over it?)"
            if layout else "")
    return (f"{key}: {mismatch_message(folder, problems)}{hint}. The weights were replaced or only partly written, or "
            f"belong to another model: save or download the model again, or load an earlier checkpoint")


BUILTIN_IDS = (TINY_ID,)
FILE_KINDS = {b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"PK\x03\x04": "a zip archive",
              b"GIF8": "a GIF image", b"%PDF": "a PDF document"}


def describe_file(path: Path) -> str:
    """What a file is, in a few words, from its name and first bytes (for errors about files that are no model)."""
    if path.name == "model_index.json":
        return f"the model_index.json of a Diffusers folder (give the folder itself: {path.parent})"
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as e:
        return f"a file that cannot be read ({e.strerror})"
    size = f"{path.stat().st_size:,} bytes"
    if not head:
        return "an empty file"
    kind = next((kind for magic, kind in FILE_KINDS.items() if head.startswith(magic)), None)
    if kind is None and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        kind = "a WebP image"
    if kind is None and path.suffix in (".bin", ".pt", ".pth"):
        kind = f"a PyTorch weights file ({path.suffix}; loadable are Diffusers folders and .safetensors/.ckpt files)"
    if kind is None:
        try:
            text = head.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        kind = ("a JSON file" if text.lstrip().startswith(("{", "[")) else "a text file") if text is not None \
            else f"a {path.suffix or 'binary'} file"
    return f"{kind}, {size}"


def check_model_id(model_id: str) -> None:
    """Refuse, by what it is, a model.id that names no model: a built-in typo, an existing file that is no model."""
    if model_id.startswith("builtin:") and model_id not in BUILTIN_IDS:
        names = {known.removeprefix("builtin:"): known for known in BUILTIN_IDS}  # the shared prefix is no match
        close = difflib.get_close_matches(model_id.removeprefix("builtin:"), names, n=1, cutoff=0.6)
        hint = f"did you mean {names[close[0]]!r}?" if close else f"the built-in models are {', '.join(BUILTIN_IDS)}"
        raise ConfigError(f"model.id: {model_id!r} is not a built-in model; {hint}")
    path = Path(model_id).expanduser()
    if path.is_file() and path.suffix not in SINGLE_FILE_SUFFIXES:
        raise ConfigError(f"model.id: {model_id} is {describe_file(path)}, not a model; give a Diffusers SDXL "
                          f"folder, a single-file SDXL checkpoint (.safetensors/.ckpt), a hub id, or {TINY_ID!r}")


def load_configured_model(cfg: Config, model_id: str | None = None) -> SDXLParts:
    """The parts exactly as training loads them (trainer and inspector share this): `model_id` (default
    model.id; a resume checkpoint) with model.revision/variant/config_dir, the scheduler set to the objective."""
    m, t = cfg.model, cfg.training
    parts = load_parts(model_id or m.id, revision=m.revision, variant=m.variant, config_dir=m.config_dir,
                       key="training.resume_from" if model_id else "model.id")
    parts.scheduler = configure_inference_scheduler(parts.scheduler, t.prediction_type, t.zero_terminal_snr)
    return parts


SDXL_SINGLE_FILE_KEYS = ("model.diffusion_model.label_emb.0.0.weight",
                         "conditioner.embedders.1.model.positional_embedding",
                         "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight")
SDXL_CONFIG_ID = "stabilityai/stable-diffusion-xl-base-1.0"


def _single_file_markers(path: Path) -> set[str]:
    """The SDXL-identifying keys and ComfyUI markers a .safetensors file holds (reads only its header)."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"model.id: {path} cannot be read ({e}); the file is incomplete or damaged "
                          f"(an interrupted download or save?): get or export it again") from e
    missing = [k for k in SDXL_SINGLE_FILE_KEYS if k not in keys]
    if missing:
        kind = " (an SD 1.x/2.x checkpoint)" if any(k.startswith("cond_stage_model.") for k in keys) else ""
        raise ConfigError(f"model.id: {path} is not an SDXL single-file checkpoint{kind}: it lacks {missing[0]}")
    return keys & {"v_pred", "ztsnr"}


def load_single_file(path: Path, config_dir: str | None) -> SDXLParts:
    """A ComfyUI/A1111 checkpoint through diffusers' single-file loader, configs from `config_dir`."""
    from diffusers import StableDiffusionXLPipeline
    markers = _single_file_markers(path) if path.suffix == ".safetensors" else set()
    config = str(Path(config_dir).expanduser()) if config_dir else SDXL_CONFIG_ID
    if config_dir and not (Path(config) / "model_index.json").is_file():
        raise ConfigError(f"model.config_dir: {config_dir!r} is not a Diffusers SDXL folder (no model_index.json); "
                          f"it needs at least the configs and tokenizers of SDXL base")
    try:
        pipe = StableDiffusionXLPipeline.from_single_file(str(path), config=config, torch_dtype=torch.float32,
                                                          local_files_only=bool(config_dir) or _offline())
    except (OSError, ValueError, RuntimeError) as e:
        where = f"model.config_dir {config_dir!r}" if config_dir else f"{SDXL_CONFIG_ID}'s configs (hub/cache)"
        raise ConfigError(
            f"model.id: could not load the single-file checkpoint {path} with {where} "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Set model.config_dir to a local "
            f"Diffusers SDXL folder holding at least the configs and tokenizers (e.g. `huggingface-cli download "
            f"{SDXL_CONFIG_ID} --exclude '*.safetensors' '*.bin' '*.onnx*' '*.msgpack'`; for the tiny model the "
            f"folder written by --save-tiny-model)") from e
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if any(p.device.type == "meta" for p in getattr(pipe, name).parameters()):
            raise ConfigError(f"model.id: {path} lacks weights for the {name}; export the checkpoint again")
    overrides = {}
    if "v_pred" in markers:  # the file's marker wins over the borrowed scheduler config
        overrides = {"prediction_type": "v_prediction", "rescale_betas_zero_snr": "ztsnr" in markers}
    scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, **overrides)
    log.info("model: single-file checkpoint %s (configs from %s)%s", path, config,
             ", v-prediction" if overrides else "")
    return SDXLParts(pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.tokenizer,
                     pipe.tokenizer_2, scheduler)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def save_pipeline(parts: SDXLParts, directory: str | Path) -> None:
    """Save the parts as a Diffusers folder that StableDiffusionXLPipeline.from_pretrained loads."""
    from diffusers import StableDiffusionXLPipeline
    pipe = StableDiffusionXLPipeline(vae=parts.vae, text_encoder=parts.text_encoder,
                                     text_encoder_2=parts.text_encoder_2, tokenizer=parts.tokenizer,
                                     tokenizer_2=parts.tokenizer_2, unet=parts.unet,
                                     scheduler=parts.scheduler)
    pipe.save_pretrained(str(directory), safe_serialization=True)


def configure_inference_scheduler(scheduler: EulerDiscreteScheduler, prediction_type: str | None,
                                  zero_terminal_snr: bool) -> EulerDiscreteScheduler:
    """The scheduler saved with the model, set to what training used; the training scheduler derives from it.

    Zero terminal SNR rescales the betas so that ᾱ_T = 0 (Lin et al. 2024) and samples with
    "trailing" timestep spacing so that inference starts from that pure-noise step.
    """
    changes: dict = {}
    if prediction_type is not None:
        changes["prediction_type"] = prediction_type
    if zero_terminal_snr:
        changes.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    resolved = changes.get("prediction_type", scheduler.config.prediction_type)
    if zero_terminal_snr and resolved != "v_prediction":
        raise ConfigError(f"training.zero_terminal_snr: true, but the model's scheduler predicts {resolved!r}; "
                          f"set training.prediction_type to \"v_prediction\" (ε is undefined at SNR 0)")
    if not changes:
        return scheduler
    return type(scheduler).from_config(scheduler.config, **changes)


def block_types() -> tuple[type, ...]:
    """The module types sharded one by one: their weights are gathered just before they compute."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer
    return ResnetBlock2D, BasicTransformerBlock, CLIPEncoderLayer

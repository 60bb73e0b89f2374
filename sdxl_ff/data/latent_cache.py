"""VAE latent cache on disk: encode each image once, train from the cached posteriors.

An entry holds the VAE posterior's mean and standard deviation at the image's training
resolution (H/8 x W/8), so training still samples `mean + std * noise` with the run's noise
generator at every step, exactly as without the cache (this costs 2x the disk of storing one
sample, and keeps the augmentation the sampling gives).

An entry's name is a SHA-256 over everything that changes the latent: the image file's bytes,
the training resolution and crop, a fingerprint of the VAE (config and every weight), and the
cache dtype. Change any of them and the entry is simply not found and gets built; nothing is
ever reused stale. Entries are safetensors files written atomically, carrying their key and a
checksum of their tensors: a truncated or corrupt entry is found at start-up and rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from sdxl_ff.config.errors import ConfigError
from sdxl_ff.data.buckets import cover_crop
from sdxl_ff.data.masks import READING as MASK_READING
from sdxl_ff.data.masks import mask_path
from sdxl_ff.runtime.files import remove_dead_writers_leftovers, write_atomic, write_problem

log = logging.getLogger(__name__)

FORMAT = "sdxl-ff-latents-1"  # bump when the entry layout or the maths that fills it changes
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


# --------------------------------------------------------------------------- fingerprints and keys

def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes (content, not its time stamp)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def module_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 over a module's config and every tensor of its state_dict (name, dtype, shape, bytes).

    Config keys starting with "_" are bookkeeping (version, source path, and `_use_default_values`,
    a list whose order changes with each process's hash seed): left out, so the key is stable.
    """
    digest = hashlib.sha256()
    config = getattr(module, "config", None)
    if config is not None:
        config_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        config_dict = {k: v for k, v in config_dict.items() if not k.startswith("_")}
        digest.update(json.dumps(config_dict, sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # hashlib reads the buffer: no copy
    return digest.hexdigest()


def cache_dtype(setting: str, vae_dtype: torch.dtype) -> torch.dtype:
    """`auto` stores what the VAE computes in (bf16 under bf16 training, else fp32): no extra rounding."""
    return vae_dtype if setting == "auto" else DTYPES[setting]


def entry_key(*parts: object) -> str:
    return hashlib.sha256("|".join(map(str, (FORMAT, *parts))).encode()).hexdigest()


def entry_path(cache_dir: str | Path, key: str) -> Path:
    return Path(cache_dir) / key[:2] / f"{key}.safetensors"


# --------------------------------------------------------------------------- entries

def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], key: str) -> None:
    """Write an entry atomically with its key and a checksum of its tensors in the metadata."""
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    metadata = {"format": FORMAT, "key": key, "sha256": _checksum(tensors)}
    write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), shared=True)


def remove_interrupted_writes(cache_dir: str | Path) -> None:
    """Delete the temporary files of runs killed while writing entries here (never those of a run still
    writing: several runs may share a cache, so no lock guards it)."""
    if removed := remove_dead_writers_leftovers(cache_dir):
        log.warning("cache %s: removed %d temporary file(s) left by a run killed while writing, e.g. %s",
                    cache_dir, len(removed), removed[0].name)


def check_can_write(cache_dir: str | Path, key: str, missing: int, total: int) -> None:
    """Entries are missing: the folder must take them. A complete cache is only read, so it may be read-only (users
    share caches between runs and users); this refuses only when something does need writing."""
    if missing and (problem := write_problem(cache_dir)):
        raise ConfigError(f"{key}: {missing} of {total} entries are missing in {cache_dir}, and it cannot be written "
                          f"to: {problem}. A read-only cache is used only when complete: build the missing entries "
                          f"where it can be written (the same config with --cache-only), or set {key} to a folder "
                          f"you can write to")


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"cache entry {path} cannot be read ({e}); restart the run to rebuild it") from e


def valid_entry(path: Path, key: str, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype) -> bool:
    """True when the entry exists, is complete, belongs to `key`, and has the expected tensors."""
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError):
        return False
    return (metadata.get("key") == key and set(tensors) == set(shapes)
            and all(tuple(tensors[n].shape) == s and tensors[n].dtype == dtype for n, s in shapes.items())
            and metadata.get("sha256") == _checksum(tensors))


def read_entry(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of one cached posterior, [4, H/8, W/8] each."""
    tensors = read_tensors(path)
    return tensors["mean"], tensors["std"]


# --------------------------------------------------------------------------- preparing the cache

@dataclass
class CacheReport:
    entries: list[Path]  # one per dataset index
    built: list[int] = field(default_factory=list)  # dataset indices encoded by this call
    corrupt: list[int] = field(default_factory=list)  # of those, entries that existed but were broken


def latent_keys(dataset: Dataset, vae_fingerprint: str, dtype: torch.dtype) -> list[str]:
    """The cache key of every image: content hash, target size and centre crop, VAE, dtype."""
    keys = []
    for i, (record, size) in enumerate(zip(dataset.records, dataset.sizes, strict=True)):
        crop = cover_crop(record.width, record.height, size)
        parts = [file_digest(record.path), size, crop.resized, crop.top, crop.left, vae_fingerprint, dtype]
        if getattr(dataset, "with_masks", False):  # the entry holds a mask: its own key (unmasked keys unchanged)
            mode = dataset.mask_mode(i)
            parts += ["mask", mode, file_digest(mask_path(record.path)) if mode == "files" else "", MASK_READING]
        keys.append(entry_key(*parts))
    return keys


def stack_pixels(samples: list[dict]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pixels, and masks when the samples have them; a module-level function: picklable for spawned workers."""
    masks = torch.stack([s["mask"] for s in samples]) if "mask" in samples[0] else None
    return torch.stack([s["pixels"] for s in samples]), masks


def prepare_latent_cache(dataset: Dataset, vae: torch.nn.Module, cache_dir: str | Path, dtype_setting: str,
                         build_batch_size: int, num_workers: int = 0,
                         autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                         ) -> CacheReport:
    """Find every image's entry, encode the missing or broken ones with `vae` (where it is), return them all.

    `dataset` yields pixels at each image's training size with a centre crop (random crops are
    refused by the config, since they change the latent every epoch).
    """
    remove_interrupted_writes(cache_dir)
    dtype = cache_dtype(dtype_setting, vae.dtype)
    keys = latent_keys(dataset, module_fingerprint(vae), dtype)
    entries = [entry_path(cache_dir, k) for k in keys]
    todo, corrupt = [], []
    with_masks = getattr(dataset, "with_masks", False)
    for i, (key, path, (h, w)) in enumerate(zip(keys, entries, dataset.sizes, strict=True)):
        shape = (vae.config.latent_channels, h // 8, w // 8)
        shapes = {"mean": shape, "std": shape} | ({"mask": (1, h // 8, w // 8)} if with_masks else {})
        if not valid_entry(path, key, shapes, dtype):
            todo.append(i)
            if path.exists():
                corrupt.append(i)
    log.info("latent cache %s: %d of %d entries ready, %d to encode%s", cache_dir, len(keys) - len(todo),
             len(keys), len(todo), f" ({len(corrupt)} broken, rebuilding)" if corrupt else "")
    check_can_write(cache_dir, "data.latent_cache.cache_dir", len(todo), len(keys))
    for i in corrupt:
        log.warning("latent cache entry %s for %s is truncated or corrupt; rebuilding", entries[i],
                    dataset.records[i].path)
    by_size: dict[tuple[int, int], list[int]] = {}
    for i in todo:
        by_size.setdefault(dataset.sizes[i], []).append(i)
    chunks = [members[j:j + build_batch_size] for members in by_size.values()
              for j in range(0, len(members), build_batch_size)]
    from sdxl_ff.model.parts import vae_precision  # here: diffusers costs every importer of the data room seconds

    loader = DataLoader(dataset, batch_sampler=chunks, num_workers=num_workers, collate_fn=stack_pixels)
    with tqdm(total=len(todo), desc="encoding latents", unit="img", disable=not todo) as bar, torch.no_grad():
        for chunk, (pixels, masks) in zip(chunks, loader, strict=True):
            with autocast(), vae_precision(vae):
                posterior = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
            for j, i in enumerate(chunk):
                tensors = {"mean": posterior.mean[j].to(dtype), "std": posterior.std[j].to(dtype)}
                if masks is not None:  # stored in the cache dtype like the latents (valid_entry checks one dtype)
                    tensors["mask"] = masks[j].to(dtype)
                write_tensors(entries[i], tensors, keys[i])
            bar.update(len(chunk))
    return CacheReport(entries, todo, corrupt)

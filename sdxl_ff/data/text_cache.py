"""Text-embedding cache on disk: both frozen encoders' outputs per distinct caption.

Used only when neither text encoder trains. Augmented captions are cached too: the empty
caption of dropout, and for shuffles `data.text_embedding_cache.variants` pre-drawn orders of
each caption, one of which a shuffle then picks. An entry's name is a SHA-256 over the token
ids of both tokenizers, a fingerprint of both encoders' weights and the output dtype, so a
changed caption, tokenizer or encoder never reuses an old entry. Entries share the latent
cache's atomic, checksummed safetensors format.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sdxl_ff.data.latent_cache import (
    check_can_write,
    entry_key,
    entry_path,
    module_fingerprint,
    read_tensors,
    remove_interrupted_writes,
    valid_entry,
    write_tensors,
)

log = logging.getLogger(__name__)


def refusal_reason(train_text_encoder_1: bool, train_text_encoder_2: bool) -> str | None:
    """Why cached embeddings would be wrong for this run, or None when they are exact.

    Augmented captions are no reason: the cache holds every caption the run can draw (dataset.possible_captions).
    """
    for n, trained in ((1, train_text_encoder_1), (2, train_text_encoder_2)):
        if trained:
            return f"text encoder {n} is trained (model.train_text_encoder_{n}=true), so its outputs change every step"
    return None


def prepare_text_cache(captions: set[str], tokenizers: tuple, text_encoders: tuple, cache_dir: str | Path,
                       device: torch.device | str, batch_size: int = 16,
                       autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                       ) -> dict[str, Path]:
    """Encode every caption not yet cached; return caption -> entry path."""
    # here: transformers' CLIP costs every importer of the data room (dataset.py, loader workers) seconds
    from sdxl_ff.model.conditioning import encode_prompts, tokenize

    remove_interrupted_writes(cache_dir)
    fingerprint = entry_key(*(module_fingerprint(e) for e in text_encoders))
    ordered = sorted(captions)
    ids = [tokenize(t, ordered) for t in tokenizers]
    keys = [entry_key("text", fingerprint, text_encoders[0].dtype,
                      *(i[n].tolist() for i in ids)) for n in range(len(ordered))]
    paths = [entry_path(cache_dir, k) for k in keys]
    with torch.no_grad(), autocast():  # one caption to learn the shapes and dtype
        embeds, pooled = encode_prompts([""], tokenizers, text_encoders, device)
    shapes = {"prompt_embeds": tuple(embeds.shape[1:]), "pooled_prompt_embeds": tuple(pooled.shape[1:])}
    todo = [n for n in range(len(ordered)) if not valid_entry(paths[n], keys[n], shapes, embeds.dtype)]
    log.info("text-embedding cache %s: %d of %d captions ready, %d to encode", cache_dir,
             len(ordered) - len(todo), len(ordered), len(todo))
    check_can_write(cache_dir, "data.text_embedding_cache.cache_dir", len(todo), len(ordered))
    with tqdm(total=len(todo), desc="encoding captions", unit="caption", disable=not todo) as bar, torch.no_grad():
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            with autocast():
                embeds, pooled = encode_prompts([ordered[n] for n in chunk], tokenizers, text_encoders, device)
            for j, n in enumerate(chunk):
                write_tensors(paths[n], {"prompt_embeds": embeds[j], "pooled_prompt_embeds": pooled[j]}, keys[n])
            bar.update(len(chunk))
    return dict(zip(ordered, paths, strict=True))


def read_entry(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds [77, D1+D2], pooled [P]) of one cached caption."""
    tensors = read_tensors(path)
    return tensors["prompt_embeds"], tensors["pooled_prompt_embeds"]

"""The data sources a config names: `data.datasets` (or `data.image_dir` alone) resolved into folders with
repeats, loss weights, masks and their own caption settings (each source's `caption_*` key, else the data
section's), and the checks of that resolution."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from sdxl_ff.config.schema import DataConfig


@dataclass(frozen=True)
class CaptionSettings:
    """One source's caption augmentation (the `data.caption_*` keys, overridden per source)."""
    dropout_prob: float = 0.0
    shuffle_prob: float = 0.0
    separator: str = ","
    min_tokens: int = 0
    keep_tokens: int = 0
    prefix: str = ""


CAPTION_KEYS = ("caption_dropout_prob", "caption_shuffle_prob", "caption_shuffle_separator",
                "caption_shuffle_min_tokens", "caption_keep_tokens", "caption_prefix")


@dataclass(frozen=True)
class Source:
    """One folder of training images and how it is used."""
    name: str
    key: str  # the config key that names the folder, for messages: data.image_dir or data.datasets[i].image_dir
    image_dir: str
    repeats: int = 1
    loss_weight: float = 1.0
    masks: bool = False
    mask_from_alpha: bool = False
    captions: CaptionSettings = CaptionSettings()


def resolve_sources(d: DataConfig) -> list[Source]:
    """`data.datasets` as Sources, or the single `data.image_dir` source with the top-level caption settings."""
    top = {key: getattr(d, key) for key in CAPTION_KEYS}
    if not d.datasets:
        return [Source(Path(d.image_dir).name or "images", "data.image_dir", d.image_dir,
                       captions=_caption_settings(top))]
    sources = []
    for i, s in enumerate(d.datasets):
        own = {key: getattr(s, key) if getattr(s, key) is not None else top[key] for key in CAPTION_KEYS}
        sources.append(Source(s.name or Path(s.image_dir).name or f"source{i}", f"data.datasets[{i}].image_dir",
                              s.image_dir, s.repeats, s.loss_weight, s.masks, s.mask_from_alpha,
                              _caption_settings(own)))
    return sources


def _caption_settings(values: dict) -> CaptionSettings:
    return CaptionSettings(values["caption_dropout_prob"], values["caption_shuffle_prob"],
                           values["caption_shuffle_separator"], values["caption_shuffle_min_tokens"],
                           values["caption_keep_tokens"], values["caption_prefix"])


def source_errors(d: DataConfig) -> list[str]:
    """Config problems of the sources (folders on disk are checked when they are scanned)."""
    if not d.datasets:
        errors = []
        if d.caption_shuffle_prob > 0 and not d.caption_shuffle_separator:
            errors.append('data.caption_shuffle_separator: "" cannot split a caption into parts; use e.g. ","')
        return errors
    errors = []
    if d.image_dir is not None:
        errors.append(f"data.image_dir: {d.image_dir!r} is set together with data.datasets; a run reads either one "
                      f"folder or a list of sources: remove data.image_dir (add it to data.datasets as a source)")
    for i, s in enumerate(d.datasets):
        if not s.image_dir:
            errors.append(f"data.datasets[{i}].image_dir: missing; every source needs the folder of its images")
        if s.mask_from_alpha and not s.masks:
            errors.append(f"data.datasets[{i}].mask_from_alpha: true, but data.datasets[{i}].masks is false; set "
                          f"masks to true to train with the alpha channel as the mask, or remove mask_from_alpha")
    sources = resolve_sources(d)
    for i, source in enumerate(sources):
        if source.captions.shuffle_prob > 0 and not source.captions.separator:
            errors.append(f'data.datasets[{i}].caption_shuffle_separator: "" cannot split a caption into parts '
                          f'(caption_shuffle_prob is {source.captions.shuffle_prob:g}); use e.g. ","')
    names = Counter(s.name for s in sources)
    for name, count in names.items():
        if count > 1:
            where = [f"data.datasets[{i}]" for i, s in enumerate(sources) if s.name == name]
            errors.append(f"data.datasets: {count} sources are named {name!r} ({', '.join(where)}; a source without "
                          f"a name is named after its folder); give each a distinct \"name\"")
    if all(s.loss_weight == 0 for s in sources):
        errors.append("data.datasets: every source has loss_weight 0, so nothing would be learned; give at least "
                      "one source a positive loss_weight")
    return errors

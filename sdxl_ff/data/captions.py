"""Captions: each source's augmentation settings, dropout and shuffling, pre-drawn shuffle orders for the
text-embedding cache, and the fixed prefix. Pure functions of the caption, the settings and a random stream."""

from __future__ import annotations

import random

from sdxl_ff.config.sources import CaptionSettings


def augment_caption(caption: str, aug: CaptionSettings, rng: random.Random, variants: int = 0,
                    variant_seed: int = 0) -> str:
    """Drop the caption (to "") or shuffle its parts; the first `keep_tokens` parts never move.

    Parts are split at the separator and stripped; shuffling applies only to captions with at
    least `min_tokens` parts and rejoins them with the separator plus a space. The two draws are
    always made, so one setting never changes the other's randomness. With `variants` (the
    text-embedding cache), a shuffle picks one of that many pre-drawn orders of the caption
    (`shuffled_variant`), so every caption the run can draw is known, and cached, in advance.
    """
    drop, shuffle = rng.random() < aug.dropout_prob, rng.random() < aug.shuffle_prob
    if drop:
        return ""
    if shuffle and variants:
        return shuffled_variant(caption, aug, variant_seed, rng.randrange(variants))
    return _shuffled(caption, aug, rng) if shuffle else caption


def _shuffled(caption: str, aug: CaptionSettings, rng: random.Random) -> str:
    parts = [p.strip() for p in caption.split(aug.separator)] if aug.separator else [caption]
    parts = [p for p in parts if p]
    if len(parts) < max(aug.min_tokens, 2) or len(parts) - aug.keep_tokens < 2:
        return caption
    kept, moving = parts[:aug.keep_tokens], parts[aug.keep_tokens:]
    rng.shuffle(moving)
    joiner = aug.separator if aug.separator.isspace() else aug.separator + " "
    return joiner.join(kept + moving)


def shuffled_variant(caption: str, aug: CaptionSettings, seed: int, variant: int) -> str:
    """Pre-drawn order number `variant` of `caption`: a pure function of (seed, caption, variant)."""
    return _shuffled(caption, aug, random.Random(f"sdxl-ff/order/{seed}/{variant}/{caption}"))


def possible_captions(caption: str, aug: CaptionSettings, variants: int, seed: int) -> set[str]:
    """Every caption `augment_caption(caption, aug, ., variants, seed)` can give, the prefix applied."""
    drawn = {caption} | ({""} if aug.dropout_prob > 0 else set())
    if aug.shuffle_prob > 0:
        drawn |= {shuffled_variant(caption, aug, seed, v) for v in range(variants)}
    return {with_prefix(c, aug.prefix, aug.separator) for c in drawn}


def with_prefix(caption: str, prefix: str, separator: str) -> str:
    """A source's fixed caption_prefix before the (augmented) caption, joined like shuffled parts; a dropped
    caption stays empty, so dropout still teaches the unconditional prediction."""
    if not prefix or not caption:
        return caption
    joiner = separator if separator.isspace() else separator + " "
    return joiner.join([prefix, caption])

"""Augmented captions with the text-embedding cache: every drawable caption cached, the same loss as live encoding."""

import random
import subprocess

import torch
from conftest import tiny_config
from torch.utils.data import DataLoader

from sdxl_ff.data import dataset as data_lib
from sdxl_ff.data import text_cache
from sdxl_ff.model.parts import build_tiny_sdxl
from sdxl_ff.objective.predict import predict
from sdxl_ff.runtime.files import writer_tag


def test_every_drawn_caption_is_among_the_possible_ones():
    aug = data_lib.CaptionAugment(dropout_prob=0.2, shuffle_prob=0.7, keep_tokens=1, prefix="sks")
    caption = "a dog, grass, sunny, photo, wide angle"
    possible = data_lib.possible_captions(caption, aug, variants=4, seed=11)
    drawn = [data_lib.with_prefix(data_lib.augment_caption(caption, aug, random.Random(n), 4, 11), "sks", ",")
             for n in range(3000)]
    assert set(drawn) == possible  # 3000 draws reach every one of them, and nothing else
    assert "" in possible and "sks, a dog, grass, sunny, photo, wide angle" in possible
    assert 3 <= len(possible) <= 6 and all(c == "" or c.startswith("sks, a dog, ") for c in possible)
    # the pre-drawn orders depend on the seed, and on nothing drawn per sample
    assert data_lib.shuffled_variant(caption, aug, 11, 2) == data_lib.shuffled_variant(caption, aug, 11, 2)
    assert {data_lib.shuffled_variant(caption, aug, s, 0) for s in range(20)} != {data_lib.shuffled_variant(
        caption, aug, 11, 0)}


def test_cached_augmented_captions_give_the_loss_of_live_encoding(tmp_path, sample_dir):
    cfg = tiny_config(tmp_path, sample_dir, **{"data.caption_dropout_prob": "0.25", "data.caption_shuffle_prob": "0.8",
                                                "data.caption_shuffle_separator": " ", "data.caption_keep_tokens": "1",
                                                "data.text_embedding_cache.enabled": "true",
                                                "data.text_embedding_cache.variants": "3",
                                                "model.train_text_encoder_1": "false"})
    parts = build_tiny_sdxl(0)
    tokenizers, encoders = (parts.tokenizer, parts.tokenizer_2), (parts.text_encoder, parts.text_encoder_2)
    images, sampler = data_lib.build_data(cfg, seed=3, num_processes=1)
    assert images.caption_variants == 3 and images.text_entries is None  # the text cache is used: 3 orders
    written, captions = images.drawable_captions()
    gone = subprocess.Popen(["true"])  # a writer of this machine that no longer runs (as after kill -9)
    gone.wait()
    leftover = tmp_path / "te" / "ab" / f".x.safetensors.{writer_tag().split('-')[0]}-{gone.pid}.abcd1234.tmp"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(bytes(100))
    entries = text_cache.prepare_text_cache(captions, tokenizers, encoders, tmp_path / "te", "cpu")
    assert not leftover.exists()
    train_set = images.with_entries(data_lib.CachedEntries(text=entries))
    loader = DataLoader(train_set, batch_sampler=sampler, collate_fn=data_lib.collate)
    seen = set()
    for epoch in range(3):
        sampler.epoch = epoch
        for batch in loader:
            seen |= set(batch["caption"])
            live = {k: v for k, v in batch.items() if k not in ("prompt_embeds", "pooled_prompt_embeds")}
            losses = [predict(parts.unet, parts.vae, tokenizers, encoders, parts.noise_scheduler(), b,
                              torch.Generator().manual_seed(epoch)).loss_per_sample for b in (batch, live)]
            assert torch.equal(losses[0], losses[1]), batch["caption"]
    assert "" in seen and len(seen - written - {""}) > 0  # dropped and shuffled captions were trained
    assert seen <= captions

"""Aspect buckets: closest ratio, divisibility, time ids that tell the truth, one-resolution batches."""

import logging
import math
import random

import pytest
import torch
from conftest import tiny_config
from PIL import Image

from sdxl_ff.config.errors import ConfigError
from sdxl_ff.config.rules import bucket_problems
from sdxl_ff.data import dataset as data_lib
from sdxl_ff.data import scan
from sdxl_ff.data.buckets import bucket_for, bucket_stats, cover_crop
from sdxl_ff.data.records import scan_images
from sdxl_ff.model.conditioning import time_ids

# SDXL's usual training buckets, [width, height], all divisible by 64
SDXL = [[1024, 1024], [1152, 896], [896, 1152], [1216, 832], [832, 1216], [1344, 768], [768, 1344],
        [1536, 640], [640, 1536]]


def hw(resolutions):
    return [(h, w) for w, h in resolutions]


def test_closest_ratio_wins_over_many_aspect_ratios():
    buckets = hw(SDXL)
    for k in range(400):
        ratio = math.exp(-1.6 + 3.2 * k / 399)  # 0.2 .. 5.0
        width, height = max(1, round(1000 * ratio)), 1000
        chosen = bucket_for(width, height, buckets)
        distance = abs(math.log((chosen[1] / chosen[0]) / (width / height)))
        for other in buckets:  # no other bucket is closer in aspect ratio
            assert distance <= abs(math.log((other[1] / other[0]) / (width / height))) + 1e-12
        assert chosen[0] % 64 == 0 and chosen[1] % 64 == 0


@pytest.mark.parametrize("width, height, expected", [
    (1000, 1000, (1024, 1024)), (1920, 1080, (768, 1344)), (1080, 1920, (1344, 768)),
    (3000, 2000, (832, 1216)), (4000, 1000, (640, 1536)), (1200, 1000, (896, 1152))])
def test_known_bucket_choices(width, height, expected):
    assert bucket_for(width, height, hw(SDXL)) == expected


def test_bucket_config_errors_name_the_resolution():
    errors = bucket_problems([[1024, 1024], [1000, 768]], 64, {})
    assert errors == ["data.bucket.resolutions: 1000x768 is not divisible by data.bucket.divisible_by=64; "
                      "round it to a multiple of 64"]
    # the seed README's example names 832x1216, which is not in its resolutions list
    errors = bucket_problems([[1024, 1024], [896, 1152]], 64, {"832x1216": 2, "896x1152": 1})
    assert len(errors) == 1 and "'832x1216' is not one of data.bucket.resolutions" in errors[0]


def test_config_refuses_bad_buckets(tmp_path):
    with pytest.raises(ConfigError, match="1000x1000 is not divisible by data.bucket.divisible_by=64"):
        tiny_config(tmp_path, tmp_path, **{"data.bucket.enabled": "true", "data.bucket.resolutions": "[[1000,1000]]"})
    with pytest.raises(ConfigError, match="random crop changes the latent"):
        tiny_config(tmp_path, tmp_path, **{"data.random_crop": "true", "data.latent_cache.enabled": "true"})


def write_images(folder, sizes):
    for n, (w, h) in enumerate(sizes):
        colours = torch.randint(0, 256, (h // 10 + 1, w // 10 + 1, 3), generator=torch.Generator().manual_seed(n))
        Image.fromarray(colours.to(torch.uint8).numpy()).resize((w, h), Image.Resampling.NEAREST) \
            .save(folder / f"{n:02d}.png")
        (folder / f"{n:02d}.txt").write_text(f"image {n}")


SOURCES = [(1500, 1000), (1000, 1500), (1000, 1000), (1920, 1080), (700, 900), (333, 250), (2000, 600)]


@pytest.mark.parametrize("random_crop", [False, True])
def test_time_ids_equal_real_original_size_and_crop(tmp_path, random_crop):
    write_images(tmp_path, SOURCES)
    buckets = [(128, 128), (112, 144), (144, 112)]
    ds = data_lib.CaptionedImageDataset(scan_images(tmp_path),
                                        lambda r: bucket_for(r.width, r.height, buckets), seed=5,
                                        random_crop=random_crop)
    crops = set()
    for epoch in range(3):
        for index, (w, h) in enumerate(SOURCES):
            sample = ds[(epoch, index)]
            th, tw = ds.sizes[index]
            ids = time_ids(sample["original_size"][None], sample["crop_top_left"][None], sample["target_size"][None])
            top, left = int(ids[0, 2]), int(ids[0, 3])
            assert ids[0, :2].tolist() == [h, w] and ids[0, 4:].tolist() == [th, tw]
            # Redo the resize independently and cut at the time ids' crop: the pixels must be identical.
            scale = max(tw / w, th / h)
            resized = Image.open(ds.records[index].path).convert("RGB").resize(
                (max(tw, math.ceil(w * scale - 1e-6)), max(th, math.ceil(h * scale - 1e-6))),
                Image.Resampling.LANCZOS)
            assert 0 <= top <= resized.height - th and 0 <= left <= resized.width - tw
            expected = data_lib.to_pixels(resized.crop((left, top, left + tw, top + th)))
            assert torch.equal(sample["pixels"], expected)
            crops.add((index, top, left))
    assert (len(crops) > len(SOURCES)) == random_crop  # random crops move between epochs; centre crops never


def test_centre_crop_closed_form():
    # 1500x1000 into 1152x896: scale max(0.768, 0.896) = 0.896 -> 1344x896; left (1344-1152)/2 = 96
    assert cover_crop(1500, 1000, (896, 1152)) == cover_crop(1500, 1000, (896, 1152), None)
    plan = cover_crop(1500, 1000, (896, 1152))
    assert (plan.resized, plan.top, plan.left) == ((896, 1344), 0, 96)
    rng = random.Random(0)
    lefts = {cover_crop(1500, 1000, (896, 1152), rng).left for _ in range(200)}
    assert min(lefts) == 0 and max(lefts) == 192


def test_no_batch_mixes_resolutions_and_batch_sizes_per_resolution():
    a, b, c = (64, 64), (64, 128), (128, 64)
    sizes = [a] * 10 + [b] * 5 + [c] * 1
    for drop_last, expected in ((True, {a: [3, 3, 3], b: [2, 2], c: []}),
                                (False, {a: [3, 3, 3, 1], b: [2, 2, 1], c: [1]})):
        sampler = data_lib.SameSizeBatchSampler(sizes, 2, seed=11, drop_last=drop_last, batch_size_for={a: 3})
        for epoch in range(4):
            got = {a: [], b: [], c: []}
            seen = []
            for batch in sampler.batches(epoch):
                assert len({sizes[i] for i in batch}) == 1
                got[sizes[batch[0]]].append(len(batch))
                seen += batch
            assert {k: sorted(v, reverse=True) for k, v in got.items()} == expected
            assert len(seen) == len(set(seen))
    stats = {s.size: s for s in bucket_stats(sizes, {a: 3}, 2, drop_last=True)}
    assert (stats[a].batches, stats[a].never_seen, stats[c].batches, stats[c].never_seen) == (3, 0, 0, 1)


def test_build_data_logs_buckets_and_warns_about_unseen_images(tmp_path, caplog):
    images = tmp_path / "imgs"
    images.mkdir()
    write_images(images, [(300, 200)] * 5 + [(200, 300)] * 3 + [(200, 200)])
    cfg = tiny_config(tmp_path, images, **{
        "data.bucket.enabled": "true", "data.bucket.resolutions": "[[192,128],[128,192],[128,128]]",
        "data.bucket.batch_size": "2", "data.bucket.per_resolution_batch_sizes": '{"128x192": 3}',
        "training.grad_accum_steps": "2"})
    with caplog.at_level(logging.INFO):
        train_set, sampler = data_lib.build_data(cfg, seed=1, num_processes=1)
    assert sorted(set(train_set.sizes)) == [(128, 128), (128, 192), (192, 128)]
    text = caplog.text
    assert "192x128: 5 images, batch 2 per process (effective 4), 2 batches per epoch" in text
    assert "128x192: 3 images, batch 3 per process (effective 6), 1 batches per epoch" in text
    assert "128x128: 1 images, batch 2 per process (effective 4), 0 batches per epoch" in text
    assert "bucket 128x128 holds 1 images, fewer than its batch size 2" in text
    assert "these 1 images will never be seen" in text
    assert len(sampler) == 3


def test_bucket_batch_size_overrides_training_batch_size(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path, **{"data.bucket.enabled": "true", "data.bucket.batch_size": "3"})
    assert scan.batch_sizes(cfg) == (3, {}, True)
    cfg = tiny_config(tmp_path, tmp_path, **{"data.bucket.enabled": "true", "data.bucket.drop_last": "false"})
    assert scan.batch_sizes(cfg) == (4, {}, False)  # training.batch_size=4 from tiny_overrides


def test_sampler_state_records_position_and_order(caplog):
    sizes = [(64, 64)] * 7 + [(64, 128)] * 4
    sampler = data_lib.SameSizeBatchSampler(sizes, 2, seed=3)
    state = sampler.state_dict(epoch=1, next_batch=2)
    assert (state["epoch"], state["next_batch"], state["order"]) == (1, 2, sampler.batches(1))
    assert data_lib.SameSizeBatchSampler(sizes, 2, seed=3).check_order(state)
    end = sampler.state_dict(epoch=1, next_batch=len(sampler))
    assert (end["epoch"], end["next_batch"], end["order"]) == (2, 0, sampler.batches(2))
    with caplog.at_level(logging.WARNING):
        assert not data_lib.SameSizeBatchSampler(sizes[:-1], 2, seed=3).check_order(state)
    assert "changed since the state was saved" in caplog.text


def test_malformed_entry_is_not_also_a_duplicate():
    from sdxl_ff.config.rules import bucket_problems
    errors = bucket_problems([[1024, 1024, 3], [896, 1152]], 64, {})
    assert errors == ["data.bucket.resolutions: [1024, 1024, 3] is not a [width, height] pair of positive integers"]
    assert bucket_problems([[1024, 1024], [1024, 1024]], 64, {}) == \
        ["data.bucket.resolutions: [[1024, 1024], [1024, 1024]] lists a resolution twice"]

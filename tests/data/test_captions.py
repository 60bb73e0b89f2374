"""Caption augmentation: dropout rate, shuffle with a kept prefix, min_tokens, determinism under the seed."""

import math
from collections import Counter

from torch.utils.data import DataLoader

from sdxl_ff.data import dataset as data_lib
from sdxl_ff.data.dataset import CaptionAugment, augment_caption, sample_rng
from sdxl_ff.data.records import scan_images
from sdxl_ff.data.synthetic import write_sample_set

CAPTION = "photo of sks, a dog, red collar, grass, sunny day, bokeh"


def draws(aug, n=20000, caption=CAPTION, seed=1):
    return [augment_caption(caption, aug, sample_rng(seed, i // 1000, i % 1000)) for i in range(n)]


def test_dropout_rate_within_binomial_tolerance():
    n, p = 20000, 0.3
    dropped = sum(c == "" for c in draws(CaptionAugment(dropout_prob=p), n))
    sigma = math.sqrt(n * p * (1 - p))  # 64.8
    assert abs(dropped - n * p) < 4 * sigma, dropped
    assert all(c == CAPTION for c in draws(CaptionAugment(dropout_prob=0.0), 2000))
    assert all(c == "" for c in draws(CaptionAugment(dropout_prob=1.0), 2000))


def test_shuffle_rate_within_binomial_tolerance():
    n, p = 20000, 0.4
    changed = sum(c != CAPTION for c in draws(CaptionAugment(shuffle_prob=p), n))
    q = p * (1 - 1 / math.factorial(6))  # a shuffle of 6 parts leaves the order unchanged 1 time in 720
    assert abs(changed - n * q) < 4 * math.sqrt(n * q * (1 - q)), changed


def test_shuffle_keeps_the_multiset_and_the_kept_prefix():
    parts = [p.strip() for p in CAPTION.split(",")]
    orders = Counter()
    for caption in draws(CaptionAugment(shuffle_prob=1.0, keep_tokens=2), 3000):
        got = caption.split(", ")
        assert sorted(got) == sorted(parts)
        assert got[:2] == ["photo of sks", "a dog"]
        orders[tuple(got[2:])] += 1
    assert len(orders) == math.factorial(4)  # every order of the 4 moving parts occurs
    assert min(orders.values()) > 3000 / 24 / 2  # roughly uniform (expected 125 each)


def test_min_tokens_and_separator():
    three = "a, b, c"
    aug = CaptionAugment(shuffle_prob=1.0, min_tokens=4)
    assert all(c == three for c in draws(aug, 500, caption=three))
    assert len(set(draws(aug, 500, caption="a, b, c, d"))) == 24
    pipes = draws(CaptionAugment(shuffle_prob=1.0, separator="|"), 500, caption="x|y|z")
    assert {tuple(sorted(c.split("| "))) for c in pipes} == {("x", "y", "z")} and len(set(pipes)) == 6
    # nothing to shuffle once the kept prefix covers all but one part
    assert set(draws(CaptionAugment(shuffle_prob=1.0, keep_tokens=2), 200, caption="a, b, c")) == {"a, b, c"}


def test_same_seed_same_captions_whatever_the_workers_and_the_resume_point(tmp_path):
    write_sample_set(tmp_path, count=12)
    tagged = "green, circle, on red, flat, simple, shape"
    (tmp_path / "003_green_circle_on_red.txt").write_text(tagged)
    records = scan_images(tmp_path)
    aug = CaptionAugment(dropout_prob=0.2, shuffle_prob=0.5)

    def epoch_captions(seed, workers, epoch, start=0):
        ds = data_lib.CaptionedImageDataset(records, lambda r: (64, 64), aug, seed=seed)
        sampler = data_lib.SameSizeBatchSampler(ds.sizes, 3, seed)
        sampler.epoch, sampler.start = epoch, start
        loader = DataLoader(ds, batch_sampler=sampler, collate_fn=data_lib.collate, num_workers=workers)
        return [(path, cap) for b in loader for path, cap in zip(b["path"], b["caption"], strict=True)]

    single = [epoch_captions(7, 0, e) for e in range(4)]
    assert [epoch_captions(7, 2, e) for e in range(4)] == single  # two worker processes: same captions
    assert epoch_captions(7, 0, 2, start=2) == single[2][6:]  # resumed at batch 2 of epoch 2
    assert epoch_captions(8, 0, 0) != single[0]
    flat = [c for e in single for _, c in e]
    shuffled = [c for c in flat if c != tagged and sorted(c.split(", ")) == sorted(tagged.split(", "))]
    assert "" in flat and shuffled  # dropout and shuffle both happened
    assert len({tuple(e) for e in single}) == 4  # the epochs differ

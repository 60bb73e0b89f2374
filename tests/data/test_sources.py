"""data.datasets: several folders with repeats, loss weights and their own captions; their start-up errors."""

import json
import logging
import subprocess
import sys
from collections import Counter

import pytest
from conftest import ROOT, run_in_process, tiny_config
from helpers import PROBE

from sdxl_ff.config.errors import ConfigError
from sdxl_ff.config.sources import resolve_sources
from sdxl_ff.data import dataset as data_lib
from sdxl_ff.data import scan, sources
from sdxl_ff.data.records import DataError, scan_images
from sdxl_ff.data.synthetic import draw_shape


def write_folder(folder, count, width, height, caption="a red circle, blue background, flat, centred", start=0):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + count):
        draw_shape("circle", "red", "blue", width, height, scale=0.3 + 0.05 * i).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(caption)
    return folder


def datasets_config(tmp, entries, **extra):
    """A tiny config whose data comes from `entries` (data.datasets) instead of data.image_dir."""
    return tiny_config(tmp, tmp, **{"data.image_dir": "null", "data.datasets": json.dumps(entries), **extra})


@pytest.fixture
def two_folders(tmp_path):
    main = write_folder(tmp_path / "main", 5, 128, 128)
    small = write_folder(tmp_path / "small", 2, 160, 96, caption="a blue square, on red")
    return main, small


def test_per_source_samples_per_epoch_are_repeats_times_images(tmp_path, two_folders):
    main, small = two_folders
    cfg = datasets_config(tmp_path, [{"image_dir": str(main)}, {"image_dir": str(small), "repeats": 3,
                                                                 "name": "small"}],
                          **{"training.batch_size": "2"})
    train_set, sampler = data_lib.build_data(cfg, seed=5, num_processes=1)
    image_source = [r.source for r in train_set.records]
    for epoch in range(3):
        batches = sampler.batches(epoch)
        assert sources.batches_per_source(batches, sampler.units, image_source, 2) == [5 * 1, 2 * 3]
        assert sorted(u for b in batches for u in b) == list(range(11))  # every (image, repeat) once
        for batch in batches:
            assert len({sampler.unit_sizes[u] for u in batch}) == 1  # one resolution per batch
    # the order is a pure function of (seed, epoch): a fresh sampler gives it again
    _, again = data_lib.build_data(cfg, seed=5, num_processes=1)
    assert [again.batches(e) for e in range(3)] == [sampler.batches(e) for e in range(3)]
    assert sampler.batches(0) != sampler.batches(1)
    # repeats after the first are their own samples: (epoch, index, repeat), with their own randomness
    keys = [k for batch in sampler for k in batch]
    assert Counter(len(k) for k in keys) == {2: 7, 3: 4}
    assert data_lib.sample_rng(5, 0, 3, 0).random() == data_lib.sample_rng(5, 0, 3).random()
    assert data_lib.sample_rng(5, 0, 3, 1).random() != data_lib.sample_rng(5, 0, 3).random()


def test_one_image_dir_is_one_source_and_unchanged(tmp_path, two_folders):
    """data.image_dir alone: the old samples and order, bit for bit (no loss_weight or mask keys added)."""
    main, _ = two_folders
    extra = {"data.caption_dropout_prob": "0.3", "data.caption_shuffle_prob": "0.7", "data.random_crop": "true"}
    cfg = tiny_config(tmp_path, main, **extra)
    train_set, sampler = data_lib.build_data(cfg, seed=9, num_processes=1)
    old_set = data_lib.CaptionedImageDataset(scan_images(main), data_lib.target_size_rule(cfg),
                                             data_lib.CaptionAugment(0.3, 0.7), seed=9, random_crop=True)
    old_sampler = data_lib.SameSizeBatchSampler(old_set.sizes, 4, 9)
    assert [sampler.batches(e) for e in range(2)] == [old_sampler.batches(e) for e in range(2)]
    for epoch in range(2):
        for i in range(len(old_set)):
            new, old = train_set[(epoch, i)], old_set[(epoch, i)]
            assert new.keys() == old.keys() and new["caption"] == old["caption"]
            assert all((new[k] == old[k]).all() for k in ("pixels", "crop_top_left"))


def test_caption_settings_per_source(tmp_path, two_folders):
    main, small = two_folders
    cfg = datasets_config(tmp_path, [
        {"image_dir": str(main), "caption_prefix": "sks style", "caption_keep_tokens": 1},
        {"image_dir": str(small), "caption_dropout_prob": 1.0, "caption_prefix": "never seen"}],
        **{"data.caption_shuffle_prob": "1.0"})
    train_set, _ = data_lib.build_data(cfg, seed=1, num_processes=1)
    main_caps = [train_set[(e, i)]["caption"] for e in range(4) for i in range(5)]
    assert all(c.startswith("sks style, a red circle, ") for c in main_caps)  # prefix, then the kept part
    assert len(set(main_caps)) > 1  # the top-level shuffle applies to the rest
    assert {train_set[(0, i)]["caption"] for i in (5, 6)} == {""}  # dropout drops the prefix too
    s0, s1 = resolve_sources(cfg.data)
    assert (s0.captions.shuffle_prob, s0.captions.keep_tokens, s1.captions.keep_tokens) == (1.0, 1, 0)
    assert (s0.name, s1.name) == ("main", "small")  # named after their folders


def test_loss_weight_in_batches_only_when_a_source_differs_from_one(tmp_path, two_folders):
    main, small = two_folders
    cfg = datasets_config(tmp_path, [{"image_dir": str(main)}, {"image_dir": str(small), "loss_weight": 0.25}])
    train_set, sampler = data_lib.build_data(cfg, seed=1, num_processes=1)
    weights = {train_set[k]["path"]: float(train_set[k]["loss_weight"]) for b in sampler for k in b}
    assert {p: w for p, w in weights.items()} == {str(r.path): (0.25 if r.source else 1.0)
                                                   for r in train_set.records}
    plain = datasets_config(tmp_path, [{"image_dir": str(main)}, {"image_dir": str(small), "repeats": 2}])
    train_set, _ = data_lib.build_data(plain, seed=1, num_processes=1)
    assert "loss_weight" not in train_set[0] and "mask" not in train_set[0]


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("entries, extra, message", [
    ([{"image_dir": "A", "repeats": 0}], {}, "data.datasets[0].repeats: 0 is out of range; allowed: >= 1"),
    ([{"image_dir": "A", "loss_weight": -0.5}], {},
     "data.datasets[0].loss_weight: -0.5 is out of range; allowed: >= 0"),
    ([{"image_dir": "A", "name": "x"}, {"image_dir": "B", "name": "x"}], {},
     "data.datasets: 2 sources are named 'x' (data.datasets[0], data.datasets[1]"),
    ([{"image_dir": "a/img"}, {"image_dir": "b/img"}], {}, "2 sources are named 'img'"),
    ([{"image_dir": "A", "repeat": 2}], {}, "unknown key 'data.datasets[0].repeat'; did you mean "
                                            "'data.datasets[0].repeats'?"),
    ([{"repeats": 2}], {}, "data.datasets[0].image_dir: missing"),
    ([{"image_dir": "A", "mask_from_alpha": True}], {}, "data.datasets[0].mask_from_alpha: true, but "
                                                        "data.datasets[0].masks is false"),
    ([{"image_dir": "A", "loss_weight": 0}], {}, "every source has loss_weight 0"),
    ([{"image_dir": "A", "caption_shuffle_prob": 0.5, "caption_shuffle_separator": ""}], {},
     'data.datasets[0].caption_shuffle_separator: "" cannot split'),
    ([{"image_dir": "A"}], {"data.image_dir": "B"}, "data.image_dir: 'B' is set together with data.datasets"),
])
def test_config_errors_name_the_key(tmp_path, entries, extra, message):
    with pytest.raises(ConfigError) as e:
        tiny_config(tmp_path, tmp_path, **{"data.image_dir": "null", "data.datasets": json.dumps(entries), **extra})
    assert message in str(e.value)


def test_missing_or_empty_source_folder_names_the_key(tmp_path, two_folders):
    main, _ = two_folders
    (tmp_path / "empty").mkdir()
    for folder, message in ((tmp_path / "nope", f"data.datasets[1].image_dir: '{tmp_path / 'nope'}' is not a folder"),
                            (tmp_path / "empty", f"data.datasets[1].image_dir: no usable images (PNG/JPG/WebP with "
                                                 f".txt captions) in {tmp_path / 'empty'}")):
        cfg = datasets_config(tmp_path, [{"image_dir": str(main)}, {"image_dir": str(folder)}])
        with pytest.raises(DataError) as e:
            data_lib.build_data(cfg, seed=1, num_processes=1)
        assert str(e.value) == message


def test_same_image_in_two_sources_is_warned_once_with_the_count(tmp_path, two_folders, caplog):
    main, _ = two_folders
    cfg = datasets_config(tmp_path, [{"image_dir": str(tmp_path), "name": "all"}, {"image_dir": str(main)}])
    with caplog.at_level(logging.WARNING):
        train_set, sampler = data_lib.build_data(cfg, seed=1, num_processes=1)
    warnings = [r.getMessage() for r in caplog.records if "more than one source" in r.getMessage()]
    assert len(warnings) == 1 and "5 image(s) belong to more than one source" in warnings[0]
    assert "in 'all', 'main'" in warnings[0]
    assert len(train_set) == 12 and len(sampler.units) == 12  # allowed: seen once per source


def test_bad_source_stops_the_cli_before_training(tmp_path, two_folders):
    main, _ = two_folders
    entries = json.dumps([{"image_dir": str(main)}, {"image_dir": str(tmp_path / "missing")}])
    result = run_in_process("--config", str(ROOT / "configs" / "quickstart.json"), "--set", "data.image_dir=null",
                            "--set", f"data.datasets={entries}", "--set", "eval.final.enabled=false",
                            "--set", f"run.output_root={tmp_path / 'out'}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"error: data.datasets[1].image_dir: '{tmp_path / 'missing'}' is not a folder" in result.stderr
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- dataset.py --config

def test_dataset_cli_json_schema(tmp_path, two_folders, capsys, monkeypatch):
    main, small = two_folders
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({
        "model": {"id": "no-such/model-anywhere", "train_text_encoder_1": False},  # never loaded
        "run": {"name": "describe"}, "training": {"num_steps": 1, "batch_size": 2},
        "data": {"datasets": [{"image_dir": str(main), "name": "main"},
                              {"image_dir": str(small), "repeats": 3, "loss_weight": 0.5, "name": "reg"}],
                 "bucket": {"enabled": True, "resolutions": [[128, 128], [160, 96]], "divisible_by": 32,
                            "drop_last": False}}}))
    import dataset  # the JSON form in this process; the table below runs as the user's command
    monkeypatch.chdir(tmp_path)
    assert dataset.main(["--config", str(config), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [{k: s[k] for k in ("name", "images", "repeats", "samples_per_epoch", "loss_weight")}
            for s in info["sources"]] == [
        {"name": "main", "images": 5, "repeats": 1, "samples_per_epoch": 5, "loss_weight": 1.0},
        {"name": "reg", "images": 2, "repeats": 3, "samples_per_epoch": 6, "loss_weight": 0.5}]
    assert info["buckets"] == [
        {"resolution": "160x96", "width": 160, "height": 96, "samples": 6, "batch_size": 2, "batches_per_epoch": 3,
         "samples_never_seen": 0},
        {"resolution": "128x128", "width": 128, "height": 128, "samples": 5, "batch_size": 2,
         "batches_per_epoch": 3, "samples_never_seen": 0}]
    assert (info["images"], info["samples_per_epoch"], info["batches_per_epoch"]) == (7, 11, 6)
    # the user's `python dataset.py --config CFG`, then the heavy modules it had imported: none, it loads no model
    text = subprocess.run([sys.executable, "-c", PROBE, str(ROOT / "dataset.py"), "--config", str(config)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert text.stdout.endswith("exit 0 imported []\n"), text.stdout + text.stderr[-2000:]
    assert "7 images, 11 samples and 6 batches per epoch" in text.stdout
    assert "reg" in text.stdout and text.stderr == ""  # our lines only, no library noise


def test_describe_matches_the_sampler(tmp_path, two_folders):
    main, small = two_folders
    cfg = datasets_config(tmp_path, [{"image_dir": str(main)}, {"image_dir": str(small), "repeats": 2}],
                          **{"training.batch_size": "3"})
    info = scan.describe(cfg)
    _, sampler = data_lib.build_data(cfg, seed=1, num_processes=1)
    assert info["batches_per_epoch"] == len(sampler) and info["samples_per_epoch"] == len(sampler.units) == 9
    assert "main" in sources.format_description(info)



def reference_batches(sizes, batch_size, seed, epoch, drop_last=False, batch_size_for=None, num_replicas=1,
                      repeats=None):
    """SameSizeBatchSampler.batches as it was before issue 28 (units listed one by one): the order to keep."""
    import torch
    units = [(i, r) for i, n in enumerate(repeats or [1] * len(sizes)) for r in range(n)]
    unit_sizes = [sizes[i] for i, _ in units]
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(units), generator=generator).tolist()
    groups = {}
    for index in order:
        groups.setdefault(unit_sizes[index], []).append(index)
    batches = []
    keep_partial = not drop_last and num_replicas == 1
    for size in sorted(groups):
        members = groups[size]
        n = (batch_size_for or {}).get(size, batch_size) * num_replicas
        for i in range(0, len(members), n):
            chunk = members[i:i + n]
            if len(chunk) == n or keep_partial:
                batches.append(chunk)
    shuffle = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffle]


@pytest.mark.parametrize("case", [
    dict(sizes=[(64, 64)] * 7, batch_size=2),
    dict(sizes=[(64, 64), (64, 96), (96, 64)] * 5 + [(128, 128)], batch_size=3, repeats=[1, 2, 5, 3] * 4),
    dict(sizes=[(64, 64), (64, 96)] * 9, batch_size=4, drop_last=True, batch_size_for={(64, 96): 3}),
    dict(sizes=[(64, 64), (64, 96), (96, 64)] * 11, batch_size=2, num_replicas=2, repeats=[3] * 33),
    dict(sizes=[(96, 64), (64, 64)] * 500, batch_size=5, repeats=list(range(1, 11)) * 100),
])
def test_the_epoch_order_is_the_one_of_before_bit_for_bit(case):
    # issue 28 item 8: the units are no longer listed one by one; every order (and so every resume) is unchanged
    for seed in (0, 7):
        sampler = data_lib.SameSizeBatchSampler(case["sizes"], case["batch_size"], seed, case.get("drop_last", False),
                                                case.get("batch_size_for"), num_replicas=case.get("num_replicas", 1),
                                                repeats=case.get("repeats"))
        for epoch in range(3):
            expected = reference_batches(seed=seed, epoch=epoch, **case)
            assert sampler.batches(epoch) == expected and len(sampler) == len(expected)
            sampler.epoch, sampler.start = epoch, 1
            units = [[sampler.units[u] for u in b] for b in expected[1:]]
            keys = [[(epoch, i, r) if r else (epoch, i) for i, r in b] for b in units]
            share = case["batch_size"] if case.get("num_replicas", 1) > 1 else None
            assert list(sampler) == [k[:share] for k in keys]  # rank 0 takes the first share of a global batch
        units = list(sampler.units)
        repeats = case.get("repeats") or [1] * len(case["sizes"])
        assert units == [(i, r) for i, n in enumerate(repeats) for r in range(n)]


def test_a_huge_repeats_is_refused_at_once_naming_the_key(tmp_path, two_folders):
    # issue 28: repeats 1000000000 was a MemoryError traceback after 9 GB
    import resource
    main, small = two_folders
    cfg = datasets_config(tmp_path, [{"image_dir": str(main)}, {"image_dir": str(small), "repeats": 1_000_000_000}])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ConfigError) as e:
        data_lib.build_data(cfg, seed=1, num_processes=1)
    assert str(e.value).startswith("data.datasets[1].repeats: 1000000000 repeats of 2 images make 2,000,000,005 "
                                   "samples per epoch; an epoch holds at most 10,000,000")
    with pytest.raises(ConfigError, match="data.datasets.1..repeats: 1000000000 repeats"):
        scan.describe(cfg)
    # refused before anything is sized by the samples: the process's peak memory (KiB) has not grown by 100 MB
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000


def test_an_epoch_of_millions_of_samples_starts_fast(tmp_path, two_folders):
    # issue 28: repeats 1000000 took 49 s and 2.2 GB for 2 steps: the epoch's order is now arrays, not lists
    main, small = two_folders
    cfg = datasets_config(tmp_path, [{"image_dir": str(main)}, {"image_dir": str(small), "repeats": 1_000_000}],
                          **{"training.batch_size": "4"})
    train_set, sampler = data_lib.build_data(cfg, seed=1, num_processes=1)
    assert len(sampler.units) == 2_000_005 and len(sampler) == 2 + 500_000  # 5 at 128x128 (4+1), 2M at 96x160
    first = next(iter(sampler))
    assert len(first) in (1, 4) and all(len(k) in (2, 3) for k in first)

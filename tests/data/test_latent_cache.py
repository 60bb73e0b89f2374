"""Latent cache: built once, never stale (content, bucket, VAE, dtype in the key), broken entries rebuilt."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from sdxl_ff.data import dataset as data_lib
from sdxl_ff.data import latent_cache
from sdxl_ff.data.buckets import bucket_for
from sdxl_ff.data.records import scan_images
from sdxl_ff.data.synthetic import draw_shape
from sdxl_ff.model.parts import build_tiny_sdxl

BUCKETS = [(128, 128), (128, 160), (160, 128)]
SHAPES = [(160, 128, "circle"), (200, 150, "square"), (128, 160, "triangle"), (130, 130, "circle")]


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for n, (w, h, shape) in enumerate(SHAPES):
        draw_shape(shape, "red", "blue", w, h).save(folder / f"{n}.png")
        (folder / f"{n}.txt").write_text(shape)
    return folder


@pytest.fixture
def vae():
    """The tiny SDXL's real AutoencoderKL, counting the images it encodes."""
    model = build_tiny_sdxl(0).vae.eval()
    model.encoded = []
    encode = model.encode

    def counting(pixels, *args, **kwargs):
        model.encoded.append(pixels.shape[0])
        return encode(pixels, *args, **kwargs)

    model.encode = counting
    return model


def dataset_of(folder, size_of=None):
    return data_lib.CaptionedImageDataset(scan_images(folder),
                                          size_of or (lambda r: bucket_for(r.width, r.height, BUCKETS)))


def build(ds, vae, cache, dtype="fp32"):
    vae.encoded.clear()
    return latent_cache.prepare_latent_cache(ds, vae, cache, dtype, build_batch_size=2)


def test_second_run_encodes_nothing_and_entries_hold_the_posterior(images, vae, tmp_path):
    cache = tmp_path / "cache"
    ds = dataset_of(images)
    first = build(ds, vae, cache)
    assert first.built == [0, 1, 2, 3] and sum(vae.encoded) == 4
    assert max(vae.encoded) <= 2  # build_batch_size
    second = build(ds, vae, cache)
    assert second.built == [] and vae.encoded == [] and second.entries == first.entries
    for i in range(4):
        mean, std = latent_cache.read_entry(first.entries[i])
        h, w = ds.sizes[i]
        assert mean.shape == std.shape == (4, h // 8, w // 8) and mean.dtype == torch.float32
        with torch.no_grad():  # one image here, batches of 2 in the build: fp32 sums in another order
            posterior = vae.encode(ds[i]["pixels"][None].float()).latent_dist
        torch.testing.assert_close(mean, posterior.mean[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(std, posterior.std[0], rtol=1e-4, atol=1e-5)
    assert not [p for p in cache.rglob("*") if p.is_file() and p.suffix != ".safetensors"]  # no temp files


def test_changed_pixels_rebuild_exactly_that_image(images, vae, tmp_path):
    cache = tmp_path / "cache"
    build(dataset_of(images), vae, cache)
    draw_shape("square", "red", "green", 200, 150).save(images / "1.png")  # same size, other pixels
    assert build(dataset_of(images), vae, cache).built == [1]


def test_changed_bucket_rebuilds_exactly_that_image(images, vae, tmp_path):
    cache = tmp_path / "cache"
    build(dataset_of(images), vae, cache)

    def size_of(record):  # image 2 moves to the square bucket; the others keep theirs
        return (128, 128) if record.path.name == "2.png" else bucket_for(record.width, record.height, BUCKETS)

    report = build(dataset_of(images, size_of), vae, cache)
    assert report.built == [2] and vae.encoded == [1]


def test_changed_vae_weights_or_dtype_rebuild_everything(images, vae, tmp_path):
    cache = tmp_path / "cache"
    build(dataset_of(images), vae, cache)
    assert build(dataset_of(images), vae, cache, dtype="fp16").built == [0, 1, 2, 3]
    with torch.no_grad():
        vae.encoder.conv_in.bias[0] += 1e-3
    assert build(dataset_of(images), vae, cache).built == [0, 1, 2, 3]
    assert build(dataset_of(images), vae, cache).built == []


def test_truncated_or_corrupt_entry_is_rebuilt(images, vae, tmp_path):
    cache = tmp_path / "cache"
    entries = build(dataset_of(images), vae, cache).entries
    good = [t.clone() for t in latent_cache.read_entry(entries[3])]  # load_file maps the file
    entries[0].write_bytes(entries[0].read_bytes()[:-100])  # truncated
    data = bytearray(entries[3].read_bytes())
    data[-5] ^= 0xFF  # one flipped byte inside the tensors
    entries[3].write_bytes(bytes(data))
    report = build(dataset_of(images), vae, cache)
    assert report.built == [0, 3] and report.corrupt == [0, 3]
    for rebuilt, expected in zip(latent_cache.read_entry(entries[3]), good, strict=True):
        assert torch.equal(rebuilt, expected)


WRITER = """
import sys
from pathlib import Path
from sdxl_ff.runtime.files import write_atomic
def write(tmp):  # held mid-entry until killed (stdin stays open)
    tmp.write_bytes(bytes(4096)); print(tmp.name, flush=True); sys.stdin.read()
write_atomic(Path(sys.argv[1]), write, shared=True)
"""


def test_a_writer_killed_mid_entry_leaves_a_file_the_next_build_removes(images, vae, tmp_path, caplog):
    """kill -9 while writing a cache entry leaves its temporary file; the next build (of any run sharing the
    cache) removes it, but never the file of a run still writing, nor one written from another machine."""
    cache = tmp_path / "cache"
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(cache / "ab" / f"{name}.safetensors")],
                                cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
               for name in ("killed", "running")]
    try:
        killed, running = (cache / "ab" / w.stdout.readline().strip() for w in writers)
        writers[0].kill()
        writers[0].wait()
        assert killed.is_file() and running.is_file()
        elsewhere = cache / "ab" / ".x.safetensors.0badbeef-1.abcdefgh.tmp"  # another machine's writer
        elsewhere.write_bytes(b"")
        with caplog.at_level("WARNING", logger=latent_cache.__name__):
            assert build(dataset_of(images), vae, cache).built == [0, 1, 2, 3]
        assert not killed.exists() and running.is_file() and elsewhere.is_file()
        assert f"removed 1 temporary file(s) left by a run killed while writing, e.g. {killed.name}" in caplog.text
    finally:
        writers[1].kill()
        writers[1].wait()


def test_module_fingerprint_sees_every_weight():
    a, b = build_tiny_sdxl(0).vae, build_tiny_sdxl(0).vae
    assert latent_cache.module_fingerprint(a) == latent_cache.module_fingerprint(b)
    with torch.no_grad():
        b.decoder.conv_out.weight[0, 0, 0, 0] += 1e-6  # even the decoder, which encoding never uses
    assert latent_cache.module_fingerprint(a) != latent_cache.module_fingerprint(b)


FINGERPRINT_VAE = dict(block_out_channels=[8, 8, 8, 8], layers_per_block=1, norm_num_groups=1,
                       down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)


def test_module_fingerprint_is_the_same_in_every_process():
    """diffusers' `_use_default_values` list changes order with PYTHONHASHSEED; the cache key must not.

    This process against one started with another hash seed (one Python start-up, not two)."""
    script = ("from diffusers import AutoencoderKL; from sdxl_ff.data.latent_cache import module_fingerprint; "
              "import torch; torch.manual_seed(0); "
              f"v = AutoencoderKL.from_config({FINGERPRINT_VAE!r}); "
              "assert len(v.config._use_default_values) > 3; print(module_fingerprint(v))")
    own = os.environ.get("PYTHONHASHSEED", "random")
    other = str(int(own) + 1) if own.isdigit() else "1"  # a random seed here equals 1 with odds 2**-32
    there = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": other}).stdout.split()[-1]
    from diffusers import AutoencoderKL
    with torch.random.fork_rng():
        torch.manual_seed(0)
        here = AutoencoderKL.from_config(FINGERPRINT_VAE)
    assert len(here.config._use_default_values) > 3
    assert latent_cache.module_fingerprint(here) == there


def test_a_dataset_reads_the_cache_it_was_built_with_and_takes_no_entries_later(images, vae, tmp_path):
    ds = dataset_of(images)
    report = build(ds, vae, tmp_path / "cache")
    for name, value in (("latent_entries", report.entries), ("entries", data_lib.CachedEntries(report.entries))):
        with pytest.raises(AttributeError):
            setattr(ds, name, value)  # the entries come with the construction
    cached = ds.with_entries(data_lib.CachedEntries(latents=tuple(report.entries)))
    assert ds.latent_entries is None and "pixels" in ds[0]  # the dataset it came from still reads the images
    assert cached.sizes == ds.sizes and [r.path for r in cached.records] == [r.path for r in ds.records]
    for i in range(len(ds)):
        sample = cached[(2, i)]
        mean, std = latent_cache.read_entry(report.entries[i])
        assert "pixels" not in sample and torch.equal(sample["latent_mean"], mean)
        assert torch.equal(sample["latent_std"], std) and sample["caption"] == ds[(2, i)]["caption"]
    with pytest.raises(ValueError, match="3 latent cache entries for 4 records"):
        ds.with_entries(data_lib.CachedEntries(latents=tuple(report.entries[:3])))

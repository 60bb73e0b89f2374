"""Training from the caches gives the losses of training without them, with no VAE or text-encoder passes."""

import logging

import pytest
import torch
from conftest import ROOT, run_in_process, tiny_config, tiny_overrides
from diffusers import AutoencoderKL
from transformers import CLIPTextModel

import train_sdxl_ff
from sdxl_ff.config.errors import ConfigError
from sdxl_ff.data.text_cache import refusal_reason

STEPS = 3
IMAGES = ROOT / "data" / "images"


@pytest.fixture(scope="module")
def counted(tmp_path_factory):
    """train() in-process with every VAE encode and text-encoder forward counted; log lines collected."""
    calls = {"vae": 0, "text": 0}
    encode, forward = AutoencoderKL.encode, CLIPTextModel.forward

    def counting_encode(self, *args, **kwargs):
        calls["vae"] += 1
        return encode(self, *args, **kwargs)

    def counting_forward(self, *args, **kwargs):
        calls["text"] += 1
        return forward(self, *args, **kwargs)

    AutoencoderKL.encode, CLIPTextModel.forward = counting_encode, counting_forward
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("sdxl_ff").addHandler(handler)
    tmp = tmp_path_factory.mktemp("cache_runs")

    def run(cache_only=False, **overrides):
        calls.update(vae=0, text=0)
        records.clear()
        cfg = tiny_config(tmp, IMAGES, steps=STEPS, **overrides)
        losses = train_sdxl_ff.train(cfg, cache_only=cache_only, overwrite=True)["losses"]  # runs share a folder
        return losses, dict(calls), "\n".join(records)

    yield tmp, run
    AutoencoderKL.encode, CLIPTextModel.forward = encode, forward
    logging.getLogger("sdxl_ff").removeHandler(handler)


@pytest.fixture(scope="module")
def plain(counted):
    _, run = counted
    return run()


def latent_settings(tmp):
    return {"data.latent_cache.enabled": "true", "data.latent_cache.cache_dir": str(tmp / "latents"),
            "data.latent_cache.dtype": "fp32"}


def test_latent_cache_same_losses_and_no_encodes_on_second_run(counted, plain):
    tmp, run = counted
    losses, _, _ = plain
    assert plain[1]["vae"] == STEPS  # without the cache: one encode per batch
    first, calls, log = run(**latent_settings(tmp))
    assert calls["vae"] == 6  # 12 images in build batches of 2, before training, none during it
    assert "0 of 12 entries ready, 12 to encode" in log and "the VAE is on the CPU" in log
    second, calls, log = run(**latent_settings(tmp))
    assert calls["vae"] == 0 and "12 of 12 entries ready, 0 to encode" in log
    assert second == first  # the cache is read, not recomputed: bit-identical
    # Measured over 4 steps: 1.3e-6 relative (the VAE encoded batches of 2 for the cache, of 4 without it).
    for cached, uncached in zip(first, losses, strict=True):
        assert abs(cached - uncached) <= 1e-4 * uncached


def test_text_embedding_cache_same_losses_without_encoder_passes(counted, plain):
    tmp, run = counted
    settings = {"data.text_embedding_cache.enabled": "true", "data.text_embedding_cache.cache_dir": str(tmp / "te")}
    first, calls, log = run(**settings)
    assert first == plain[0]  # frozen encoders: cached embeddings are exactly the computed ones
    assert "0 of 12 captions ready, 12 to encode" in log
    again, calls, log = run(**settings, **latent_settings(tmp))
    assert all(abs(a - b) <= 1e-4 * b for a, b in zip(again, first, strict=True))  # latents cached as well
    # One probe of the empty caption to learn the shapes; encoder 2 wraps a CLIPTextModel, hence 2 forwards.
    assert calls == {"vae": 0, "text": 2}
    assert "12 of 12 captions ready, 0 to encode" in log and "both text encoders are on the CPU" in log
    _, _, log = run(cache_only=True, **settings, **{"data.caption_dropout_prob": "0.5"})
    assert "12 of 13 captions ready, 1 to encode" in log  # dropout's empty caption joins


def test_text_embedding_cache_refused_with_reason(counted):
    tmp, run = counted
    settings = {"data.text_embedding_cache.enabled": "true", "data.text_embedding_cache.cache_dir": str(tmp / "te")}
    _, calls, log = run(**settings, **{"model.train_text_encoder_1": "true", "training.lr_text_encoder_1": "1e-4"})
    assert "text-embedding cache not used: text encoder 1 is trained (model.train_text_encoder_1=true)" in log
    assert calls["text"] == 2 * STEPS  # encoded at every step
    assert refusal_reason(False, False) is None  # augmented captions are cached too (next test)


def test_text_embedding_cache_with_augmented_captions_encodes_nothing_while_training(counted):
    tmp, run = counted
    settings = {"data.text_embedding_cache.enabled": "true", "data.text_embedding_cache.cache_dir": str(tmp / "aug"),
                "data.caption_dropout_prob": "0.3", "data.caption_shuffle_prob": "1.0",
                "data.caption_shuffle_separator": " ", "data.text_embedding_cache.variants": "3"}
    first, _, log = run(**settings)
    # 12 captions as written, "" for dropout, and up to 3 shuffled word orders of each (some coincide)
    assert "embeddings for every caption the run can draw: 12 captions as written, 1 empty" in log
    assert "up to 3 per caption, data.text_embedding_cache.variants" in log
    again, calls, log = run(**settings)
    assert calls["text"] == 2 and ", 0 to encode" in log  # the shape probe only: no encoder pass while training
    assert again == first


def test_cache_only_builds_and_exits(tmp_path):
    args = tiny_overrides(tmp_path, IMAGES, steps=1, **latent_settings(tmp_path))
    proc = run_in_process("--cache-only", *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "12 to encode" in proc.stderr and "--cache-only: caches are complete" in proc.stderr
    assert len(list((tmp_path / "latents").rglob("*.safetensors"))) == 12
    assert not (tmp_path / "out").exists()  # nothing trained, nothing saved
    with pytest.raises(ConfigError, match="--cache-only: no cache is enabled"):
        train_sdxl_ff.train(tiny_config(tmp_path, IMAGES), cache_only=True)
    trained_encoder = tiny_config(tmp_path, IMAGES, **{"data.text_embedding_cache.enabled": "true",
                                                       "model.train_text_encoder_1": "true",
                                                       "training.lr_text_encoder_1": "1e-4"})
    with pytest.raises(ConfigError, match=r"--cache-only: the only enabled cache, data.text_embedding_cache, cannot "
                                          r"be used: text encoder 1 is trained"):
        train_sdxl_ff.train(trained_encoder, cache_only=True)


def test_worker_processes_give_the_same_losses_and_sampler_state_is_saved(counted, plain):
    tmp, run = counted
    losses, _, log = run(**{"data.num_workers": "2"})
    assert losses == plain[0]
    state = torch.load(tmp / "out" / "test" / "trainer_state.pt", weights_only=False)
    assert (state["sampler"]["epoch"], state["sampler"]["next_batch"]) == (1, 0)  # 3 steps = one epoch of 3
    assert sorted(i for b in state["sampler"]["order"] for i in b) == list(range(12))


def test_a_complete_read_only_cache_is_read_and_an_incomplete_one_refused(tmp_path):
    # issue 28: a complete cache on a read-only folder was refused at start-up ("cannot write to ..."), though a
    # run from it writes nothing; users share caches between runs and users. A real read-only mount: chmod does
    # not stop root, who runs these tests in CI.
    import subprocess

    from conftest import run_in_process, small_disk_at
    with small_disk_at(tmp_path / "shared", 32) as disk:
        caches = {**latent_settings(disk), "data.text_embedding_cache.enabled": "true",
                  "data.text_embedding_cache.cache_dir": str(disk / "text")}
        built = run_in_process("--cache-only", *tiny_overrides(tmp_path, IMAGES, steps=1, **caches))
        assert built.returncode == 0, built.stderr
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        with pytest.raises(OSError, match="Read-only file system"):
            (disk / "probe").write_text("")
        trained = run_in_process(*tiny_overrides(tmp_path, IMAGES, steps=1, **caches))
        assert trained.returncode == 0, trained.stderr
        assert "latents: 12 of 12 entries ready, 0 to encode" in trained.stderr
        assert "text: 12 of 12 captions ready, 0 to encode" in trained.stderr
        # a training size the cache does not hold: its 12 entries would have to be written
        other = run_in_process(*tiny_overrides(tmp_path, IMAGES, steps=1, **caches,
                                               **{"data.size": "64", "run.name": "other"}))
        assert other.returncode == 2
        assert f"data.latent_cache.cache_dir: 12 of 12 entries are missing in {disk / 'latents'}, and it cannot " \
               f"be written to: Read-only file system" in other.stderr

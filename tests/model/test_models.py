"""The tiny SDXL has SDXL's architecture, is deterministic, saves and reloads; loading errors are clear."""

import hashlib
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import load_file, save_file

from sdxl_ff.config.errors import ConfigError
from sdxl_ff.data.records import scan_images
from sdxl_ff.model.parts import (
    TINY_ID,
    TINY_VAE_FILE,
    TINY_VAE_SCALING_FACTOR,
    TINY_VAE_SHA256,
    TinyVAEError,
    build_tiny_sdxl,
    load_parts,
    load_tiny_vae,
    save_pipeline,
)

sys.path.insert(0, str(ROOT / "tools"))


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_sdxl(0)


def test_sdxl_architecture(tiny):
    unet = tiny.unet.config
    assert unet.addition_embed_type == "text_time"
    assert unet.cross_attention_dim == tiny.text_encoder.config.hidden_size + tiny.text_encoder_2.config.hidden_size
    assert unet.projection_class_embeddings_input_dim == \
        tiny.text_encoder_2.config.projection_dim + 6 * unet.addition_time_embed_dim
    assert len(unet.down_block_types) == 3  # SDXL has exactly three down levels
    assert len(tiny.vae.config.block_out_channels) == 4  # latents are 1/8 of the image, as in SDXL
    assert tiny.vae.config.scaling_factor == TINY_VAE_SCALING_FACTOR  # its own: 1/std of its latents
    assert type(tiny.text_encoder_2).__name__ == "CLIPTextModelWithProjection"


def fresh_shapes(seed: int, count: int) -> torch.Tensor:
    """Shapes drawn from a seed the VAE never trained on (tools/train_tiny_vae.py trains on seed 0's stream)."""
    from train_tiny_vae import shapes_batch
    return shapes_batch(random.Random(seed), count, 128)


def test_tiny_vae_reconstructs_fresh_shapes(tiny):
    """The built-in VAE is trained, not random: tools/train_tiny_vae.py's metric on the first 128 of its held-out
    scenes (seeds it never trained on). The 5th percentile guards against the failure the mean hides: a large flat
    area decoded in another colour."""
    from train_tiny_vae import quality
    q = quality(tiny.vae.eval(), count=128)
    # measured 21.96 dB, 5th percentile 17.09 dB, sample-style 26.34 dB (the weights before: 17.83, 12.85, 20.90;
    # a random VAE: 8.70, 6.64, 8.48)
    assert q["psnr"] > 21.0 and q["p5"] > 16.0 and q["sample_style"] > 25.0, q


def test_tiny_vae_latents_have_unit_variance(tiny):
    """scaling_factor = 1/std of its latents, so the UNet's inputs are unit variance (as 0.13025 is for SDXL)."""
    with torch.no_grad():
        latents = tiny.vae.encode(fresh_shapes(7, 32)).latent_dist.sample(torch.Generator().manual_seed(0))
    assert (latents * tiny.vae.config.scaling_factor).std().item() == pytest.approx(1.0, abs=0.1)


def test_tiny_vae_file_is_checked(tmp_path):
    assert hashlib.sha256(TINY_VAE_FILE.read_bytes()).hexdigest() == TINY_VAE_SHA256
    damaged = tmp_path / "tiny_vae.safetensors"
    data = bytearray(TINY_VAE_FILE.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    damaged.write_bytes(bytes(data))
    with pytest.raises(TinyVAEError, match=r"sha256 [0-9a-f]{64}, expected " + TINY_VAE_SHA256):
        load_tiny_vae(damaged)
    with pytest.raises(TinyVAEError, match="cannot read its VAE weights .*train_tiny_vae.py"):
        load_tiny_vae(tmp_path / "missing.safetensors")


def test_tiny_vae_training_is_deterministic(tmp_path):
    """tools/train_tiny_vae.py gives the same bytes from the same seed, so the committed file can be rebuilt."""
    from train_tiny_vae import save, train
    digests = [save(train(steps=2, batch=2, size=64, lr=1e-3, seed=3, log_every=10**9), tmp_path / f"{i}.st")
               for i in range(2)]
    other = save(train(steps=2, batch=2, size=64, lr=1e-3, seed=4, log_every=10**9), tmp_path / "other.st")
    assert digests[0] == digests[1] != other


def test_sdxl_noise_schedule(tiny):
    s = tiny.noise_scheduler()
    assert s.config.num_train_timesteps == 1000 and s.config.beta_schedule == "scaled_linear"
    expected = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float32) ** 2
    assert torch.allclose(s.betas, expected)
    assert s.alphas_cumprod[-1].item() == pytest.approx(0.00466, abs=1e-4)  # SDXL's terminal ᾱ


def test_tokenizers_follow_sdxl_padding(tiny):
    assert tiny.tokenizer.model_max_length == 77 and tiny.tokenizer_2.model_max_length == 77
    assert tiny.tokenizer.pad_token == "<|endoftext|>"
    assert tiny.tokenizer_2.pad_token == "!" and tiny.tokenizer_2.pad_token_id == 0
    ids = tiny.tokenizer("a red circle").input_ids
    assert tiny.tokenizer.convert_ids_to_tokens(ids) == \
        ["<|startoftext|>", "a</w>", "red</w>", "circle</w>", "<|endoftext|>"]
    assert tiny.text_encoder.config.eos_token_id == tiny.tokenizer.eos_token_id


def test_deterministic_from_seed():
    a, b, c = build_tiny_sdxl(0), build_tiny_sdxl(0), build_tiny_sdxl(1)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        sa, sb, sc = (getattr(x, name).state_dict() for x in (a, b, c))
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    ua, uc = a.unet.state_dict(), c.unet.state_dict()
    assert not all(torch.equal(ua[k], uc[k]) for k in ua)


def test_save_reload_generate(tmp_path, tiny):
    save_pipeline(tiny, tmp_path / "tiny")
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "tiny", local_files_only=True)
    image = pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert image.shape == (1, 64, 64, 3) and (image >= 0).all() and (image <= 1).all()
    reloaded = load_parts(str(tmp_path / "tiny"))
    ref = tiny.unet.state_dict()
    assert all(torch.equal(ref[k], v) for k, v in reloaded.unet.state_dict().items())


def test_builtin_id_builds_tiny():
    assert load_parts(TINY_ID).unet.config.addition_embed_type == "text_time"


def test_folder_missing_components(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ConfigError, match=r"not an SDXL Diffusers folder: missing vae, text_encoder"):
        load_parts(str(tmp_path))


def test_hub_id_offline_says_what_to_do():
    with pytest.raises(ConfigError) as info:
        load_parts("nobody/not-a-model")
    assert "huggingface-cli download nobody/not-a-model" in str(info.value)
    assert "local Diffusers folder" in str(info.value)


def test_missing_path_is_clear(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_parts(str(tmp_path / "nope"))


def overflowing_vae():
    """The tiny VAE with first convolutions scaled so their outputs pass fp16's maximum (65504), as SDXL's VAE does."""
    vae = build_tiny_sdxl(0).vae.eval()
    with torch.no_grad():
        vae.encoder.conv_in.weight.mul_(1e5)
        vae.decoder.conv_in.weight.mul_(1e5)
    return vae


def test_a_file_that_is_no_model_is_named_for_what_it_is(tmp_path, monkeypatch):
    from PIL import Image
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.png")
    (tmp_path / "notes.txt").write_text("my training notes\n")
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    expected = {str(tmp_path / "photo.png"): f"is a PNG image, {(tmp_path / 'photo.png').stat().st_size} bytes, not a "
                                             f"model; give a Diffusers SDXL folder, a single-file SDXL checkpoint",
                "notes.txt": "is a text file, 18 bytes, not a model",
                str(tmp_path / "model_index.json"): f"is the model_index.json of a Diffusers folder (give the folder "
                                                    f"itself: {tmp_path})"}
    monkeypatch.chdir(tmp_path)  # a relative name of an existing file is that file, not a hub id
    for model_id, message in expected.items():
        with pytest.raises(ConfigError) as info:
            load_parts(model_id)
        assert f"model.id: {model_id} {message}" in str(info.value)
        assert "does not exist" not in str(info.value) and "huggingface-cli" not in str(info.value)


@pytest.mark.parametrize("model_id, message", [
    ("builtin:tiny-sdlx", "model.id: 'builtin:tiny-sdlx' is not a built-in model; did you mean 'builtin:tiny-sdxl'?"),
    ("builtin:flux", "model.id: 'builtin:flux' is not a built-in model; the built-in models are "
                          "builtin:tiny-sdxl"),
])
def test_builtin_typo_gets_did_you_mean(model_id, message):
    with pytest.raises(ConfigError) as info:
        load_parts(model_id)
    assert str(info.value) == message


def test_fp32_vae_stays_fp32_under_fp16_autocast(tmp_path):
    """use_bf16=false on a GPU trains under fp16 autocast; an fp32 VAE must not compute in fp16 there (NaN)."""
    from PIL import Image

    from sdxl_ff.data import dataset as data_lib
    from sdxl_ff.data.latent_cache import prepare_latent_cache, read_entry
    from sdxl_ff.eval.backends import decode
    from sdxl_ff.objective.predict import encode_latents
    vae = overflowing_vae()
    pixels = torch.linspace(-1, 1, 3 * 64 * 64).reshape(1, 3, 64, 64)
    fp32 = encode_latents(vae, pixels, torch.Generator().manual_seed(0))
    fp16_autocast = lambda: torch.autocast("cpu", dtype=torch.float16)  # noqa: E731
    with torch.no_grad(), fp16_autocast():
        assert not torch.isfinite(vae.encode(pixels).latent_dist.mean).all()  # the overflow is real
        assert not torch.isfinite(vae.decode(fp32 / vae.config.scaling_factor).sample).all()
        assert torch.equal(encode_latents(vae, pixels, torch.Generator().manual_seed(0)), fp32)
        image = decode(vae, fp32)
    assert np.array_equal(image, decode(vae, fp32)) and np.isfinite(image).all()
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray((np.arange(64 * 64 * 3) % 256).astype(np.uint8).reshape(64, 64, 3)).save(folder / "a.png")
    (folder / "a.txt").write_text("a")
    ds = data_lib.CaptionedImageDataset(scan_images(folder), lambda r: (64, 64))
    report = prepare_latent_cache(ds, vae, tmp_path / "cache", "fp32", 1, autocast=fp16_autocast)
    mean, std = read_entry(report.entries[0])
    assert torch.isfinite(mean).all() and torch.isfinite(std).all()


# ------------------------------------------------------------- weights that do not fit config.json (issue 28.4)

def broken_copy(tiny_dir, folder, component: str, change) -> Path:
    """A copy of the tiny SDXL folder whose `component` weights went through change(state)."""
    shutil.copytree(tiny_dir, folder)
    file = next((folder / component).glob("*.safetensors"))
    state = load_file(file)
    change(state)
    save_file(state, file)
    return folder


def reshaped(state):
    state["conv_in.weight"] = torch.zeros(8, 4, 3, 3)  # the tiny UNet's conv_in has 32 output channels


def two_missing(state):
    del state["conv_in.weight"], state["conv_out.bias"]


def test_unet_weights_of_another_shape_or_missing_are_named(tmp_path, tiny_dir):
    folder = broken_copy(tiny_dir, tmp_path / "shape", "unet", reshaped)
    with pytest.raises(ConfigError) as info:
        load_parts(str(folder))
    assert str(info.value) == (
        f"model.id: {folder / 'unet'}: the weights do not match {folder / 'unet' / 'config.json'}: conv_in.weight "
        f"has shape [8, 4, 3, 3], config wants [32, 4, 3, 3]. The weights were replaced or only partly written, or "
        f"belong to another model: save or download the model again, or load an earlier checkpoint")
    folder = broken_copy(tiny_dir, tmp_path / "missing", "unet", two_missing)
    with pytest.raises(ConfigError) as info:
        load_parts(str(folder), key="training.resume_from")
    assert str(info.value).startswith(f"training.resume_from: {folder / 'unet'}: the weights do not match "
                                      f"{folder / 'unet' / 'config.json'}: missing conv_in.weight; missing "
                                      f"conv_out.bias. ")


def test_text_encoder_missing_a_tensor_is_refused_not_initialised_at_random(tmp_path, tiny_dir):
    def drop_final_norm(state):
        del state[next(k for k in state if k.endswith("final_layer_norm.weight"))]
    folder = broken_copy(tiny_dir, tmp_path / "te", "text_encoder_2", drop_final_norm)
    with pytest.raises(ConfigError, match=r"^model.id: .*text_encoder_2: the weights do not match .*: missing "
                                          r"final_layer_norm.weight\. "):
        load_parts(str(folder))


def test_trainer_names_a_converter_output_written_over_the_unet(tmp_path, tiny_dir, sample_dir):
    # issue 28.4: this crashed with "NotImplementedError: Cannot copy out of meta tensor" (exit 1)
    from conftest import run_in_process, tiny_overrides

    from sdxl_ff.export.single_file import convert_folder
    folder = tmp_path / "model"
    shutil.copytree(tiny_dir, folder)
    convert_folder(tiny_dir, folder / "unet" / "diffusion_pytorch_model.safetensors")
    proc = run_in_process(*tiny_overrides(tmp_path, sample_dir, steps=1, **{"model.id": str(folder)}))
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: model.id: {folder / 'unet'}: the weights do not match "
                           f"{folder / 'unet' / 'config.json'}: missing add_embedding.linear_1.bias; ")
    assert "; unexpected conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight; " in line
    assert ("(its tensors are named as in a single-file SDXL checkpoint: was a converter's output written over it?). "
            "The weights were replaced") in line and "Traceback" not in proc.stderr

"""The inspector's maths and views: x0 inversion, x_t, loss, tokens and cross-attention heatmaps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import ROOT
from helpers import write_changed_tiny_model, write_config

from sdxl_ff.config.errors import ConfigError
from sdxl_ff.config.load import load_config
from sdxl_ff.inspector.forward_pass import (
    Inspector,
    caption_tokens,
    capture_cross_attention,
    load_inspector,
    pick_indices,
    predicted_x0,
)


def scaled_linear_alphas_cumprod(beta_start=0.00085, beta_end=0.012, steps=1000) -> torch.Tensor:
    """SDXL's ᾱ_t, computed here from the betas, independently of diffusers."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


@pytest.fixture(scope="module")
def inspector(tmp_path_factory) -> Inspector:
    cfg = load_config(write_config(tmp_path_factory.mktemp("inspect")))
    inspector = load_inspector(cfg, num_samples=3)
    parts, scheduler = inspector.models["base"]
    v_scheduler = type(scheduler).from_config(scheduler.config, prediction_type="v_prediction")
    inspector.models["v"] = (parts, v_scheduler)
    return inspector


def test_schedule_matches_the_independent_alphas(inspector):
    scheduler = inspector.models["base"][1]
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), scaled_linear_alphas_cumprod(),
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_predicted_x0_inverts_the_true_target(kind):
    """Feeding the exact ε or v of a known x0 gives back x0 at every timestep."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 250, 700, 999])
    a = scaled_linear_alphas_cumprod()[t].view(-1, 1, 1, 1).float()
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    target = eps if kind == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0
    torch.testing.assert_close(predicted_x0(x_t, target, scaled_linear_alphas_cumprod(), t, kind), x0,
                               rtol=1e-4, atol=1e-4)


def test_predicted_x0_refuses_unknown_prediction_type():
    with pytest.raises(ValueError, match="sample"):
        predicted_x0(torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2), torch.ones(10), torch.tensor([1]), "sample")


@pytest.mark.parametrize("model,kind", [("base", "epsilon"), ("v", "v_prediction")])
def test_view_x0_xt_and_loss_in_closed_form(inspector, model, kind):
    t = 640
    view = inspector.view(1, t, model)
    a = scaled_linear_alphas_cumprod()[t].float()
    # x_t is the scheduler's add_noise of the sample's latents with the fixed noise
    torch.testing.assert_close(view.noisy_latents, a.sqrt() * view.latents + (1 - a).sqrt() * view.noise,
                               rtol=1e-5, atol=1e-5)
    scheduler = inspector.models[model][1]
    torch.testing.assert_close(view.noisy_latents, scheduler.add_noise(view.latents, view.noise, torch.tensor([t])))
    if kind == "epsilon":
        x0, target = (view.noisy_latents - (1 - a).sqrt() * view.prediction) / a.sqrt(), view.noise
    else:
        x0 = a.sqrt() * view.noisy_latents - (1 - a).sqrt() * view.prediction
        target = a.sqrt() * view.noise - (1 - a).sqrt() * view.latents
    torch.testing.assert_close(view.x0_latents, x0, rtol=1e-4, atol=1e-4)
    assert view.loss == pytest.approx(((view.prediction - target) ** 2).mean().item(), rel=1e-5)
    assert view.x0_image.shape == view.noisy_image.shape == view.input_image.shape == (128, 128, 3)


def test_noise_is_fixed_per_sample_and_timestep_changes_xt(inspector):
    early, late = inspector.view(0, 10), inspector.view(0, 990)
    assert torch.equal(early.noise, late.noise) and torch.equal(early.latents, late.latents)
    assert not torch.equal(early.noisy_latents, late.noisy_latents)
    assert not np.array_equal(early.noisy_image, late.noisy_image)
    assert not torch.equal(inspector.view(1, 10).noise, early.noise)
    # near t=0 the x0 estimate is almost the clean latents whatever the UNet says; near T it is not
    err = [(v.x0_latents - v.latents).abs().mean().item() for v in (early, late)]
    assert err[0] < 0.1 * err[1]


def test_input_image_is_the_training_input(inspector):
    pixels = inspector.samples[2]["pixels"].float()
    expected = ((pixels + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    assert np.array_equal(inspector.view(2, 500).input_image, expected)


def test_token_list_matches_the_tokenizer(inspector):
    tokenizer = inspector.models["base"][0].tokenizer
    caption = inspector.samples[0]["caption"]
    assert caption == "a red circle on a green background"
    expected = ["<|startoftext|>", "a</w>", "red</w>", "circle</w>", "on</w>", "a</w>", "green</w>",
                "background</w>", "<|endoftext|>"]
    assert caption_tokens(tokenizer, caption) == expected
    assert inspector.tokens(0) == expected == tokenizer.convert_ids_to_tokens(tokenizer(caption).input_ids)
    assert inspector.view(0, 500).tokens == expected


def test_heatmaps_have_image_shape_are_normalised_and_differ(inspector):
    view = inspector.view(0, 500)
    maps = {i: view.heatmap(i) for i in range(len(view.tokens))}
    for heat in maps.values():
        assert heat.shape == view.input_image.shape[:2]
        assert heat.min().item() == 0.0 and heat.max().item() == pytest.approx(1.0)
    assert (maps[2] - maps[3]).abs().max() > 0.05  # "red" vs "circle"
    assert view.overlay(2).shape == view.input_image.shape and view.overlay(2).dtype == np.uint8
    assert not np.array_equal(view.overlay(2), view.overlay(3))


def test_attention_comes_from_the_highest_resolution_layers(inspector):
    view = inspector.view(0, 500)
    # tiny UNet: 16x16 latents; its first cross-attention level runs at half that
    assert view.attention.shape == (77, 8, 8)
    # an average of softmaxes over the 77 token positions still sums to one at every pixel
    torch.testing.assert_close(view.attention.sum(dim=0), torch.ones(8, 8), rtol=1e-5, atol=1e-5)


def test_capture_leaves_the_unet_output_unchanged(inspector):
    unet = inspector.models["base"][0].unet
    g = torch.Generator().manual_seed(3)
    x, ctx = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, 96, generator=g)
    added = {"text_embeds": torch.randn(1, 32, generator=g), "time_ids": torch.tensor([[128.0] * 2 + [0.0] * 2
                                                                                        + [128.0] * 2])}
    before = dict(unet.attn_processors)
    with torch.no_grad():
        plain = unet(x, torch.tensor([300]), ctx, added_cond_kwargs=added).sample
        with capture_cross_attention(unet) as store:
            captured = unet(x, torch.tensor([300]), ctx, added_cond_kwargs=added).sample
    assert torch.equal(plain, captured)
    assert unet.attn_processors == before  # the original processors are back
    # every attn2 once: 2 + 4 down, 2 mid, 6 + 3 up; the 8x8 level has 2 down and 3 up layers
    assert len(store) == 17
    assert sorted(p.shape[1] for p in store).count(64) == 5 and {p.shape[1] for p in store} == {16, 64}


def test_pick_indices_spreads_over_the_data():
    assert pick_indices(12, 3) == [0, 4, 8]
    assert pick_indices(2, 4) == [0, 1]


def test_compare_mode_uses_the_same_sample_timestep_and_noise(tmp_path):
    write_changed_tiny_model(tmp_path / "trained")
    cfg = load_config(write_config(tmp_path))
    inspector = load_inspector(cfg, num_samples=2, compare_with=str(tmp_path / "trained"))
    assert list(inspector.models) == ["base", "fine-tuned"]
    base, tuned = inspector.view(1, 300, "base"), inspector.view(1, 300, "fine-tuned")
    assert torch.equal(base.noise, tuned.noise) and torch.equal(base.latents, tuned.latents)
    assert torch.equal(base.noisy_latents, tuned.noisy_latents)
    assert not torch.equal(base.prediction, tuned.prediction) and base.loss != tuned.loss


def test_bf16_autocast_follows_the_fp32_view(inspector, tmp_path):
    """model.use_bf16 (the GPU default) runs in bf16 like training; the view stays close to fp32's."""
    bf16 = load_inspector(load_config(write_config(tmp_path, use_bf16=True)), num_samples=3)
    assert bf16.autocast and bf16.models["base"][0].unet.dtype == torch.bfloat16
    fast, exact = bf16.view(0, 500), inspector.view(0, 500)
    assert torch.equal(fast.noise, exact.noise)
    assert fast.loss == pytest.approx(exact.loss, rel=0.05)
    assert fast.x0_latents.dtype == torch.float32 and torch.isfinite(fast.x0_latents).all()
    assert torch.nn.functional.cosine_similarity(fast.x0_latents.flatten(), exact.x0_latents.flatten(), dim=0) > 0.99
    assert fast.heatmap(2).shape == (128, 128) and fast.heatmap(2).max() == pytest.approx(1.0)


def test_compare_mode_names_a_bad_folder(tmp_path):
    cfg = load_config(write_config(tmp_path))
    with pytest.raises(ConfigError, match=r"--model .*missing.*is not a folder"):
        load_inspector(cfg, 1, compare_with=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"--model .*empty': .* is not an SDXL Diffusers folder: missing unet, vae"):
        load_inspector(cfg, 1, compare_with=str(tmp_path / "empty"))


def test_demo_cli_reports_bad_input(tmp_path, capsys):
    import demo_training_flow

    assert demo_training_flow.main(["--config", str(tmp_path / "nope.json")]) == 2
    assert "nope.json not found" in capsys.readouterr().err
    empty = tmp_path / "no-images"
    empty.mkdir()
    assert demo_training_flow.main(["--config", write_config(tmp_path, image_dir=empty)]) == 2
    assert "data.image_dir: no usable images" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        demo_training_flow.parse_args(["--samples", "0"])
    assert "--samples must be at least 1" in capsys.readouterr().err


def test_base_model_shows_the_configured_objective(tmp_path):
    """training.prediction_type / zero_terminal_snr apply to the base model as in training (issue 4)."""
    path = write_config(tmp_path)
    cfg = load_config(path, ["training.prediction_type=v_prediction", "training.zero_terminal_snr=true"])
    _, scheduler = load_inspector(cfg, num_samples=1).models["base"]
    assert scheduler.config.prediction_type == "v_prediction" and scheduler.alphas_cumprod[-1].item() == 0.0


def test_single_file_model_id_loads_with_config_dir(tmp_path, tiny_dir):
    """model.id = a single file + model.config_dir: the inspector loads it as training does, same weights."""
    from sdxl_ff.export.single_file import convert_folder
    single = tmp_path / "tiny.safetensors"
    convert_folder(tiny_dir, single)
    path = write_config(tmp_path)
    folder = load_inspector(load_config(path, [f"model.id={tiny_dir}"]), num_samples=1)
    loaded = load_inspector(load_config(path, [f"model.id={single}", f"model.config_dir={tiny_dir}"]), num_samples=1)
    assert loaded.sources["base"] == str(single)
    parts, ref = loaded.models["base"][0], folder.models["base"][0]
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(parts, name).state_dict(), getattr(ref, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    # The cause of a once different prediction: diffusers maps a folder's safetensors file and leaves each weight
    # at its byte offset there (not 32-byte aligned), the single-file loader copies into aligned memory, and CPU
    # matrix kernels round differently on unaligned data. The inspector, like training, gives each weight its
    # own aligned copy; then both compute bit for bit alike on any CPU.
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        for model in (parts, ref):
            assert all(t.data_ptr() % 64 == 0 for t in getattr(model, name).state_dict().values()), name
    view, ref_view = loaded.view(0, 300, "base"), folder.view(0, 300, "base")
    assert torch.equal(view.prediction, ref_view.prediction) and view.loss == ref_view.loss
    with pytest.raises(ConfigError, match="Set model.config_dir"):  # without it: the error training gives too
        load_inspector(load_config(path, [f"model.id={single}"]), num_samples=1)


def test_busy_port_is_one_line_naming_the_option(tmp_path):
    """Another program listens on the port: one line naming --port, exit code 2, before any model loads."""
    import socket
    import subprocess
    import sys
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, str(ROOT / "demo_training_flow.py"), "--port", str(port)],
                              cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        f"error: --port {port}: cannot serve on 127.0.0.1:{port} (the port is in use); another program (another "
        f"inspector?) may be using it: pass another port, e.g. --port {port + 1}, or stop that program"]

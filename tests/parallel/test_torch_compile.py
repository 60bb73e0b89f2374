"""model.use_torch_compile "regional": every repeated block compiled in place, bucket shapes that do not compile
again, compile times in the log, the same losses as eager, and inductor's cache in the configured folder.

The dynamo-level checks run with the "eager" / "aot_eager" backends: which graphs are captured, when shapes
compile again and what the backward pass receives are decided before the backend, and inductor on the tiny UNet
compiles for about 5 minutes on 2 busy cores. One test runs inductor itself, on one ResnetBlock2D (about a
minute cold, seconds from its cache).
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, tiny_config
from torch._dynamo.utils import counters

from sdxl_ff.config.errors import ConfigError
from sdxl_ff.config.load import load_config
from sdxl_ff.config.schema import ModelConfig
from sdxl_ff.model.parts import build_tiny_sdxl
from sdxl_ff.parallel.torch_compile import REGIONAL_BLOCKS, apply_torch_compile, use_cache_dir
from train_sdxl_ff import train


@pytest.fixture(autouse=True)
def fresh_dynamo(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # restored after the test
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def regional(tmp_path, backend: str) -> ModelConfig:
    return ModelConfig(use_torch_compile="regional", torch_compile_kwargs={"backend": backend},
                       torch_compile_cache_dir=str(tmp_path / "compile_cache"))


def unet_step(unet, batch: int, height: int, width: int) -> None:
    c = unet.config
    g = torch.Generator().manual_seed(batch * 1000 + height)
    x = torch.randn(batch, 4, height, width, generator=g)
    pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    added = {"text_embeds": torch.randn(batch, pooled, generator=g), "time_ids": torch.randn(batch, 6, generator=g)}
    pred = unet(x, torch.tensor([500] * batch), torch.randn(batch, 77, c.cross_attention_dim, generator=g),
                added_cond_kwargs=added).sample
    F.mse_loss(pred, x).backward()


def test_regional_compiles_each_repeated_block_in_place(tmp_path, caplog):
    unet = build_tiny_sdxl(0).unet
    keys = list(unet.state_dict())
    blocks = [m for m in unet.modules() if type(m).__name__ in (*unet._repeated_blocks, *REGIONAL_BLOCKS)]
    with caplog.at_level(logging.INFO, logger="sdxl_ff"):
        assert apply_torch_compile(unet, regional(tmp_path, "eager")) is unet  # no wrapper: the UNet's forward eager
    compiled = [m for m in unet.modules() if m._compiled_call_impl is not None]
    kinds = [type(b).__name__ for b in compiled]
    # ResnetBlock2Ds: 3 levels x 2 down, 2 in the middle, 3 x 3 up; transformer blocks: down 2 x (0, 1, 2), middle
    # 2, up 3 x (2, 1, 0)
    assert compiled == blocks and kinds.count("ResnetBlock2D") == 17 and kinds.count("BasicTransformerBlock") == 17
    assert list(unet.state_dict()) == keys  # saved keys stay the model's own
    assert "torch.compile (regional): 34 repeated blocks (BasicTransformerBlock, ResnetBlock2D) with dynamic=True, " \
           "backend='eager'" in caplog.text
    assert f"inductor cache: {tmp_path / 'compile_cache'}" in caplog.text
    assert "replaces TORCHINDUCTOR_CACHE_DIR" in caplog.text  # the environment's folder is not silently dropped


def test_bucket_shapes_do_not_compile_again(tmp_path, caplog):
    unet = build_tiny_sdxl(0).unet.train()
    apply_torch_compile(unet, regional(tmp_path, "eager"))
    graphs = []
    with caplog.at_level(logging.INFO, logger="sdxl_ff"):
        for shape in [(2, 16, 16), (2, 12, 20), (2, 16, 16), (2, 12, 20), (2, 20, 12), (3, 8, 16)]:
            unet_step(unet, *shape)
            graphs.append(counters["stats"]["unique_graphs"])
    first, second = graphs[:2]
    # a square bucket first: dynamo gives equal sizes one symbol, so the first non-square one compiles what relied
    # on height == width once more; from then on every bucket (height, width, batch) reuses the graphs
    assert 0 < first <= second <= 2 * first and graphs == [first] + [second] * 5
    compiles = [r.getMessage() for r in caplog.records if r.getMessage().startswith("torch.compile: compile ")]
    assert len(compiles) == second and compiles[-1].startswith(f"torch.compile: compile {second} (dynamo) took ")
    assert " s in all so far" in compiles[-1]


def test_static_shapes_would_compile_each_bucket(tmp_path):
    """The check above can fail: with dynamic=False every new bucket compiles its own graphs."""
    unet = build_tiny_sdxl(0).unet.train()
    m = regional(tmp_path, "eager")
    m.torch_compile_kwargs["dynamic"] = False
    apply_torch_compile(unet, m)
    unet_step(unet, 2, 16, 16)
    first = counters["stats"]["unique_graphs"]
    unet_step(unet, 2, 12, 20)
    assert counters["stats"]["unique_graphs"] > first


def test_regional_training_losses_equal_eager(tmp_path, caplog):
    losses = {}
    for name, extra in (("eager", {}), ("regional", {"model.use_torch_compile": "regional",
                                                       "model.torch_compile_kwargs": '{"backend": "aot_eager"}',
                                                       "model.torch_compile_cache_dir": str(tmp_path / "cc")})):
        with caplog.at_level(logging.INFO, logger="sdxl_ff"):  # 64 px: the same 34 blocks compiled, 1/4 the pixels
            result = train(tiny_config(tmp_path, ROOT / "data" / "images", steps=3,
                                       **{"run.name": name, "data.size": "64", **extra}))
        losses[name] = result["losses"]
    assert len(losses["eager"]) == 3
    assert losses["regional"] == pytest.approx(losses["eager"], rel=1e-5, abs=1e-7)
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("torch.compile (regional): 34 repeated blocks") for m in messages)
    assert f"inductor cache: {tmp_path / 'cc'} (a restart reuses the graphs and kernels compiled there)" in messages
    compiles = [m for m in messages if m.startswith("torch.compile: compile ")]  # each graph with its backward
    assert compiles and compiles[0].startswith("torch.compile: compile 1 (dynamo) took ")


def test_inductor_writes_its_cache_to_the_folder_and_a_restart_reads_it(tmp_path):
    """The one inductor run: a ResnetBlock2D compiled by inductor computes what eager does, its graphs land in
    model.torch_compile_cache_dir, and after dynamo forgets everything (a restart) they come from there."""
    folder = tmp_path / "compile_cache"
    use_cache_dir(str(folder))
    unet = build_tiny_sdxl(0).unet
    block = unet.down_blocks[0].resnets[0]
    g = torch.Generator().manual_seed(0)
    x, temb = torch.randn(2, 32, 16, 16, generator=g), torch.randn(2, unet.config.block_out_channels[0] * 4,
                                                                    generator=g)
    eager = block(x, temb).square().mean()
    eager.backward()
    eager_grad = block.conv1.weight.grad.clone()
    for restart in (False, True):
        block.zero_grad(set_to_none=True)
        block.compile(backend="inductor", dynamic=True)
        loss = block(x, temb).square().mean()
        loss.backward()
        assert loss.item() == pytest.approx(eager.item(), rel=1e-5)
        torch.testing.assert_close(block.conv1.weight.grad, eager_grad, rtol=1e-4, atol=1e-6)
        hits = counters["inductor"]["fxgraph_cache_hit"]
        assert hits == (2 if restart else 0)  # forward and backward graph, read back from the folder
        torch._dynamo.reset()
        block._compiled_call_impl = None
    assert any((folder / "fxgraph").rglob("*")) and any(folder.rglob("*.so"))


def test_the_setting_takes_false_true_or_regional():
    base = ["training.num_steps=1", "run.name=x", "model.train_text_encoder_1=false"]
    for value, expected in (("false", False), ("true", True), ("regional", "regional")):
        assert load_config(None, [*base, f"model.use_torch_compile={value}"]).model.use_torch_compile == expected
    with pytest.raises(ConfigError, match='model.use_torch_compile: expected .*"regional".*, got "fast"'):
        load_config(None, [*base, "model.use_torch_compile=fast"])
    with pytest.raises(ConfigError, match='training.sharding is "fsdp2" but model.use_torch_compile is "regional"'):
        load_config(None, [*base, "model.use_torch_compile=regional", "training.sharding=fsdp2"])


def test_an_unusable_cache_folder_is_named_with_its_key(tmp_path):
    """A file where the folder should be (or no permission): one line naming the key, and nothing created."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=r"model.torch_compile_cache_dir: '.*file/cache' cannot be made"):
        use_cache_dir(str(blocker / "cache"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]

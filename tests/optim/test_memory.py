"""Memory modes: stochastic rounding in closed form, per-parameter and fused-backward steps equal the plain step."""

import copy

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sdxl_ff.optim.per_param import PerParamOptimizer, stochastic_round_to_bf16, training_bytes


def test_stochastic_rounding_is_unbiased():
    x = torch.full((200_000,), 1.0 + 1 / 1024)  # between bf16 neighbours 1.0 and 1.0078125
    g = torch.Generator().manual_seed(0)
    r = stochastic_round_to_bf16(x, g).float()
    assert set(r.unique().tolist()) == {1.0, 1.0078125}
    p_up = (r == 1.0078125).float().mean().item()
    assert p_up == pytest.approx(0.125, abs=4 * (0.125 * 0.875 / 200_000) ** 0.5)
    assert r.mean().item() == pytest.approx(1 + 1 / 1024, abs=2e-5)


def test_stochastic_rounding_keeps_exact_values_and_sign():
    x = torch.tensor([0.0, 1.0, -2.5, 3.140625, -1e-3])
    exact = x.to(torch.bfloat16)
    r = stochastic_round_to_bf16(x[:4], torch.Generator().manual_seed(1))
    assert torch.equal(r, exact[:4])  # values representable in bf16 never move
    neg = stochastic_round_to_bf16(torch.full((1000,), -1e-3), torch.Generator().manual_seed(2)).float()
    assert (neg < 0).all() and neg.mean().item() == pytest.approx(-1e-3, rel=2e-3)


def test_small_updates_survive_with_stochastic_rounding():
    """1000 updates of +1e-4 on a bf16 weight of 1.0: round-to-nearest loses all, SR keeps them on average."""
    g = torch.Generator().manual_seed(3)
    nearest = torch.ones(4096, dtype=torch.bfloat16)
    sr = torch.ones(4096, dtype=torch.bfloat16)
    for _ in range(1000):
        nearest = (nearest.float() + 1e-4).to(torch.bfloat16)
        sr = stochastic_round_to_bf16(sr.float() + 1e-4, g)
    assert torch.all(nearest == 1.0)
    assert sr.float().mean().item() == pytest.approx(1.1, abs=0.005)


def model_and_batch(dtype=torch.float32):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64)).to(dtype)
    x, y = torch.randn(8, 64, dtype=dtype), torch.randn(8, 64, dtype=dtype)
    return model, x, y


def named(model):
    return [("unet", n, p) for n, p in model.named_parameters()]


def train_steps(model, x, y, optimizer, steps=3):
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x).float(), y.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("fused", [False, True])
def test_per_param_and_fused_equal_plain_adamw_exactly(fused):
    ref, x, y = model_and_batch()
    train_steps(ref, x, y, torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1))
    model, _, _ = model_and_batch()
    opt = PerParamOptimizer(named(model), {"unet": 1e-2},
                            lambda groups: torch.optim.AdamW(groups, weight_decay=0.1), stochastic_rounding=False)
    if fused:
        opt.attach_fused_backward()
        for _ in range(3):
            torch.nn.functional.mse_loss(model(x), y).backward()  # the hooks step and free each gradient
            assert all(p.grad is None for p in model.parameters())
    else:
        train_steps(model, x, y, opt)
    for a, b in zip(ref.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_fused_adamw8bit_matches_plain_within_8bit_tolerance():
    import bitsandbytes as bnb
    torch.manual_seed(0)
    ref = torch.nn.Linear(256, 256)
    model = torch.nn.Linear(256, 256)
    model.load_state_dict(ref.state_dict())
    x, y = torch.randn(16, 256), torch.randn(16, 256)
    start = ref.weight.detach().clone()
    plain = bnb.optim.AdamW8bit(ref.parameters(), lr=1e-3)
    train_steps(ref, x, y, plain, steps=5)
    opt = PerParamOptimizer([("unet", n, p) for n, p in model.named_parameters()], {"unet": 1e-3},
                            lambda groups: bnb.optim.AdamW8bit(groups), stochastic_rounding=False)
    opt.attach_fused_backward()
    for _ in range(5):
        torch.nn.functional.mse_loss(model(x), y).backward()
    delta_ref, delta = ref.weight.detach() - start, model.weight.detach() - start
    assert not torch.equal(model.weight, start)
    assert torch.linalg.norm(delta - delta_ref) / torch.linalg.norm(delta_ref) < 0.05
    state = opt.optimizers["weight"].state[model.weight]
    assert state["state1"].dtype == torch.uint8


def test_bf16_weights_with_stochastic_rounding_learn():
    model, x, y = model_and_batch(torch.bfloat16)
    opt = PerParamOptimizer(named(model), {"unet": 1e-3}, lambda g: torch.optim.AdamW(g), stochastic_rounding=True,
                            generator=torch.Generator().manual_seed(0))
    first = torch.nn.functional.mse_loss(model(x).float(), y.float()).item()
    train_steps(model, x, y, opt, steps=30)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert torch.nn.functional.mse_loss(model(x).float(), y.float()).item() < 0.8 * first


def test_bf16_weights_keep_their_gradient_accumulator():
    """DDP all-reduces from hooks on each weight's AccumulateGrad node: an update must not replace that node."""
    model, x, y = model_and_batch(torch.bfloat16)
    opt = PerParamOptimizer(named(model), {"unet": 1e-3}, lambda g: torch.optim.AdamW(g), stochastic_rounding=True,
                            generator=torch.Generator().manual_seed(0))
    fired = {n: 0 for n, _ in model.named_parameters()}
    keep = []  # the nodes must outlive this set-up, as DDP's reducer keeps them
    for n, p in model.named_parameters():
        node = p.view_as(p).grad_fn.next_functions[0][0]
        node.register_hook(lambda *_, n=n: fired.__setitem__(n, fired[n] + 1))
        keep.append(node)
    before = {n: p for n, p in model.named_parameters()}
    train_steps(model, x, y, opt, steps=3)
    assert fired == {n: 3 for n in fired}
    assert all(p is before[n] and p.dtype == torch.bfloat16 for n, p in model.named_parameters())


def assert_identical(a, b, where: str):
    """Nested optimizer state equal entry by entry; tensors also in dtype."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), (where, a.dtype, b.dtype)
    else:
        assert a == b, where


@pytest.mark.parametrize("kind", ["adamw", "adamw8bit"])
def test_bf16_state_round_trip_keeps_fp32_state_and_continues_identically(kind):
    """Resuming full_bf16: the moments load as saved (fp32, not cast to the bf16 weight) and steps continue exactly."""
    import bitsandbytes as bnb
    make = (lambda g: torch.optim.AdamW(g)) if kind == "adamw" else (lambda g: bnb.optim.AdamW8bit(g))

    def build(model):
        return PerParamOptimizer(named(model), {"unet": 1e-3}, make, stochastic_rounding=True,
                                 generator=torch.Generator().manual_seed(0))
    a, x, y = model_and_batch(torch.bfloat16)
    opt_a = build(a)
    train_steps(a, x, y, opt_a, steps=2)
    saved = copy.deepcopy(opt_a.state_dict())  # as read back from disk: no shared tensors
    b, _, _ = model_and_batch(torch.bfloat16)
    b.load_state_dict(a.state_dict())
    opt_b = build(b)
    opt_b.load_state_dict(saved)
    opt_b.generator.set_state(opt_a.generator.get_state())
    for name, opt in opt_b.optimizers.items():  # every state entry as saved, dtype included
        assert_identical(opt.state_dict()["state"], saved[name]["state"], name)
    assert any(t.dtype == torch.float32 for t in opt_b.state_tensors())
    train_steps(a, x, y, opt_a, steps=2)
    train_steps(b, x, y, opt_b, steps=2)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_state_dict_round_trip_continues_identically():
    a, x, y = model_and_batch()
    make = lambda g: torch.optim.AdamW(g)  # noqa: E731
    opt_a = PerParamOptimizer(named(a), {"unet": 1e-2}, make, stochastic_rounding=False)
    train_steps(a, x, y, opt_a, steps=2)
    b, _, _ = model_and_batch()
    b.load_state_dict(a.state_dict())
    opt_b = PerParamOptimizer(named(b), {"unet": 1e-2}, make, stochastic_rounding=False)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # as read back from disk: no shared tensors
    train_steps(a, x, y, opt_a, steps=2)
    train_steps(b, x, y, opt_b, steps=2)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_training_bytes_counts_weights_grads_and_state():
    model, x, y = model_and_batch()
    opt = torch.optim.AdamW(model.parameters())
    train_steps(model, x, y, opt, steps=1)
    n = sum(p.numel() for p in model.parameters())
    report = training_bytes(list(model.parameters()), opt, grad_bytes=4 * n)
    # fp32 weights (4) + fp32 grads (4) + two fp32 moments (8), plus one scalar step per tensor
    assert report["bytes_per_parameter"] == pytest.approx(16.0, abs=0.01)


# ----------------------------------------------------------------------------- in the trainer

from conftest import ROOT, run_in_process, tiny_config, tiny_overrides, unet_weights  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402

from sdxl_ff.config.errors import ConfigError  # noqa: E402
from sdxl_ff.model.trainables import Trainables  # noqa: E402
from sdxl_ff.optim.optimizers import build_optimizer  # noqa: E402
from train_sdxl_ff import train  # noqa: E402


def cfg_with(**overrides):
    return tiny_config(ROOT / ".unused", ROOT / "data" / "images", steps=1, base=ROOT / "config.json", **overrides)


@pytest.mark.parametrize("overrides, message", [
    ({"model.full_bf16": "true", "model.use_bf16": "false"}, "model.full_bf16 is true but model.use_bf16 is false"),
    ({"training.fused_backward": "true", "training.grad_accum_steps": "2"},
     "cannot accumulate gradients: training.grad_accum_steps is 2"),
    ({"training.fused_backward": "true", "training.max_grad_norm": "1.0"},
     "cannot clip the global gradient norm"),
])
def test_contradictions_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        cfg_with(**overrides)


@pytest.mark.parametrize("kind", ["adamw", "adamw8bit"])
def test_fused_backward_in_trainer_equals_plain_step(tmp_path, kind):
    weights = {}
    for name, extra in (("plain", {}), ("fused", {"training.fused_backward": "true"})):
        train(tiny_config(tmp_path, ROOT / "data" / "images", steps=3, base=ROOT / "config.json",
                          **{"run.name": name, "optimizer.type": kind, "training.max_grad_norm": "null", **extra}))
        weights[name] = unet_weights(tmp_path / "out" / name)
    base = weights["plain"]
    assert all(torch.equal(base[k], weights["fused"][k]) for k in base)  # exact, 8-bit included


@pytest.mark.parametrize("mode", ["full_bf16", "fused_backward"])
def test_memory_modes_learn_in_trainer(tmp_path, mode):
    extra = {"model.full_bf16": "true"} if mode == "full_bf16" else {"training.fused_backward": "true"}
    args = tiny_overrides(tmp_path, ROOT / "data" / "images", steps=12,
                          **{"model.use_bf16": "true", "training.max_grad_norm": "null", **extra,
                             "model.train_text_encoder_1": "true", "training.lr_text_encoder_1": "1e-5",
                             "training.tensorboard.enabled": "true",
                             "training.tensorboard.base_dir": str(tmp_path / "tb")})
    proc = run_in_process(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # one optimizer: torchao's with bf16 weights, bitsandbytes' (without its per-tensor wait) with fp32 ones
    logged = {"full_bf16": ("optimizer: AdamW8bit (torchao", "bf16 weights with stochastic rounding"),
              "fused_backward": ("optimizer: AdamW8bit (bitsandbytes", "no host wait per tensor), fused backward pass")}
    assert all(text in proc.stderr for text in logged[mode])
    losses = torch.load(tmp_path / "out" / "test" / "trainer_state.pt", weights_only=False)["losses"]
    assert sum(losses[-4:]) / 4 < 0.75 * sum(losses[:4]) / 4
    # one optimizer group per tensor, but one lr scalar per trained module and step in TensorBoard
    acc = EventAccumulator(str(tmp_path / "tb" / "test"), size_guidance={"scalars": 0})
    acc.Reload()
    assert sorted(t for t in acc.Tags()["scalars"] if t.startswith("lr/")) == ["lr/text_encoder", "lr/unet"]
    for tag, lr in (("lr/unet", 1e-3), ("lr/text_encoder", 1e-5)):
        assert [e.step for e in acc.Scalars(tag)] == list(range(1, 13))
        assert [e.value for e in acc.Scalars(tag)] == pytest.approx([lr] * 12)


def mid_unet():
    """SDXL's widths with fewer layers (185 M parameters): large enough that per-tensor overheads vanish."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(320, 640, 640),
        layers_per_block=1, transformer_layers_per_block=(1, 1, 1), attention_head_dim=(5, 10, 10),
        cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)


@pytest.mark.parametrize("mode, limit", [("fp32", 10.1), ("full_bf16", 6.1), ("fused", 4.1)])
def test_bytes_per_trainable_parameter(mode, limit):
    overrides = {"optimizer.type": "adamw8bit", "training.max_grad_norm": "null"}
    if mode != "fp32":
        overrides.update({"model.use_bf16": "true", "model.full_bf16": "true"})
    if mode == "fused":
        overrides["training.fused_backward"] = "true"
    cfg = cfg_with(**overrides)
    unet = mid_unet().to(torch.bfloat16 if mode != "fp32" else torch.float32)
    params = list(unet.parameters())
    optimizer, _ = build_optimizer(cfg, Trainables({"unet": unet}), torch.Generator().manual_seed(0))
    alive = []
    if mode == "fused":  # registered after the optimizer's hooks: sees what is left once each step ran
        for p in params:
            p.register_post_accumulate_grad_hook(lambda _: alive.append(sum(q.grad is not None for q in params)))
    dtype = params[0].dtype
    x = torch.randn(1, 4, 8, 8, dtype=dtype)
    added = {"text_embeds": torch.randn(1, 1280, dtype=dtype), "time_ids": torch.randn(1, 6, dtype=dtype)}
    unet(x, torch.tensor([10]), torch.randn(1, 77, 2048, dtype=dtype), added_cond_kwargs=added).sample.float().mean() \
        .backward()
    if mode == "fused":
        assert alive and max(alive) == 0  # every gradient was freed by its own step before the next arrived
        grad_bytes = optimizer.peak_grad_bytes
    else:
        grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in params)
        optimizer.step()
    report = training_bytes(params, optimizer, grad_bytes if mode != "fused" else 0)
    assert report["parameters"] > 150e6
    assert report["bytes_per_parameter"] <= limit, report
    if mode == "fused":
        largest = max(p.numel() * p.element_size() for p in params)
        assert optimizer.peak_grad_bytes <= largest

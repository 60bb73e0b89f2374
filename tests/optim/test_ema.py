"""EMA against its closed form: untouched before the warmup, decay**N per update, swap, state, clean keys."""

import pytest
import torch

from sdxl_ff.optim.ema import EMA, ema_for


def linear(value: float) -> torch.nn.Linear:
    layer = torch.nn.Linear(3, 2)
    with torch.no_grad():
        for p in layer.parameters():
            p.fill_(value)
    return layer


def set_all(module: torch.nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(value)


def test_closed_form_after_k_updates_and_untouched_before_warmup():
    d, n, start = 0.9, 3, 5
    layer = linear(0.0)
    ema = EMA({"m": layer}, decay=d, update_every=n, start_step=start)
    for step in range(start):
        set_all(layer, float(step))
        assert ema.update(step) is False and ema.shadow is None  # inactive before the warmup
    expected = None
    for step in range(start, 15):
        set_all(layer, float(step))
        changed = ema.update(step)
        if step == start:
            expected = float(step)  # starts as a copy of the weights
        elif (step - start) % n == 0:
            expected = d**n * expected + (1 - d**n) * step
        assert changed == (step == start or (step - start) % n == 0)
    assert ema.num_updates == 3  # steps 8, 11, 14
    closed = d**9 * 5 + sum((1 - d**3) * d ** (3 * (3 - j)) * (5 + 3 * j) for j in (1, 2, 3))
    assert expected == pytest.approx(closed)
    for value in ema.shadow.values():
        assert torch.allclose(value, torch.full_like(value, closed), atol=1e-6)


def test_same_horizon_whatever_the_interval():
    """decay**N per update: with constant weights the shadow after S steps is θ + (θ0 − θ)·d**S for any N."""
    results = []
    for every in (1, 4):
        layer = linear(1.0)
        ema = EMA({"m": layer}, decay=0.95, update_every=every, start_step=0)
        ema.update(0)
        set_all(layer, 3.0)
        for step in range(1, 13):
            ema.update(step)
        results.append(ema.shadow["m.weight"][0, 0].item())
    assert results[0] == pytest.approx(3.0 + (1.0 - 3.0) * 0.95**12)
    assert results[1] == pytest.approx(results[0], rel=1e-6)


def test_swap_in_and_out_is_exact():
    layer = linear(1.0)
    ema = EMA({"m": layer}, decay=0.5, update_every=1, start_step=0)
    ema.update(0)
    set_all(layer, 3.0)
    ema.update(1)  # shadow 2.0
    trained = {k: v.clone() for k, v in layer.state_dict().items()}
    with ema.applied() as swapped:
        assert swapped and torch.equal(layer.weight, torch.full((2, 3), 2.0))
        assert torch.equal(ema.state_dict()["shadow"]["m.weight"], torch.full((2, 3), 2.0))  # EMA, wherever it is
        assert ema.update(2) is False  # never averages the EMA into itself
    assert all(torch.equal(trained[k], v) for k, v in layer.state_dict().items())
    assert torch.equal(ema.shadow["m.weight"], torch.full((2, 3), 2.0))


def test_not_started_swaps_nothing():
    layer = linear(1.0)
    ema = ema_for(True, {"m": layer}, 0.9, 10, start_step=100, on_cpu=True)
    with ema.applied() as swapped:
        assert swapped is False and layer.weight[0, 0].item() == 1.0
    assert ema.state_dict()["shadow"] is None
    assert ema_for(False, {"m": layer}, 0.9, 10, 0, False) is None


def test_state_dict_round_trip_and_mismatch():
    layer = linear(1.0)
    ema = ema_for(True, {"unet": layer}, 0.9, 2, start_step=0, on_cpu=True)
    set_all(layer, 2.0)
    ema.update(2)
    state = ema.state_dict()
    assert sorted(state["shadow"]) == ["unet.bias", "unet.weight"]
    other = EMA({"unet": linear(0.0)}, 0.9, 2, 0)
    other.load_state_dict(state)
    assert torch.equal(other.shadow["unet.weight"], ema.shadow["unet.weight"])
    assert (other.started_at, other.num_updates) == (0, 1)
    with pytest.raises(ValueError, match="EMA state does not match"):
        EMA({"text_encoder": linear(0.0)}, 0.9, 2, 0).load_state_dict(state)


def test_keys_clean_under_torch_compile_and_shadow_fp32_on_cpu():
    layer = linear(1.0).to(torch.bfloat16)
    compiled = torch.compile(layer)  # lazy: nothing is compiled until a forward pass
    assert "_orig_mod.weight" in compiled.state_dict()
    ema = ema_for(True, {"unet": compiled}, 0.9, 1, start_step=0, on_cpu=True)
    assert sorted(ema.shadow) == ["unet.bias", "unet.weight"]
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in ema.shadow.values())


def test_swap_of_bf16_weights_never_rounds_the_ema():
    """With model.full_bf16 the trained weights are bf16: swapping must leave the fp32 EMA exact."""
    layer = linear(1.0).to(torch.bfloat16)
    ema = EMA({"m": layer}, decay=0.9, update_every=1, start_step=0)
    ema.update(0)
    set_all(layer, 2.0)
    ema.update(1)  # 0.9·1 + 0.1·2 = 1.1: not representable in bf16
    exact = ema.shadow["m.weight"].clone()
    assert exact[0, 0].item() == pytest.approx(1.1) and exact[0, 0].item() != torch.tensor(1.1).bfloat16().item()
    for _ in range(2):
        with ema.applied():
            assert layer.weight.dtype == torch.bfloat16
            assert layer.weight[0, 0].item() == torch.tensor(1.1).bfloat16().item()
            assert torch.equal(ema.state_dict()["shadow"]["m.weight"], exact)
        assert layer.weight[0, 0].item() == 2.0
    assert torch.equal(ema.shadow["m.weight"], exact)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bit pattern (so -0.0 and 0.0 differ, as bit-exact restoring requires)."""
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16).clone()


def tricky_fp32(shape: tuple, generator: torch.Generator) -> torch.Tensor:
    """Random EMA values plus bf16 rounding ties (both parities), ±0, ±inf, the largest finite, subnormals."""
    values = torch.randn(shape, generator=generator).view(-1)
    specials = torch.tensor([0x3F808000, 0x3F818000, 0xBF808000 - 2**32, 0xBF818000 - 2**32],
                            dtype=torch.int32).view(torch.float32)  # 1+2**-8, 1+3·2**-8 and their negatives
    specials = torch.cat([specials, torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 3.4028235e38, 1e-40])])
    values[: len(specials)] = specials
    return values.view(shape)


def reachable_storage_bytes(ema: EMA) -> dict[int, int]:
    """Bytes of every distinct tensor storage the EMA object holds (parameters, shadow, backups), by address."""
    held = {}

    def visit(value):
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            held[storage.data_ptr()] = storage.nbytes()
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)
        elif isinstance(value, (list, tuple, set)):
            for item in value:
                visit(item)

    visit(vars(ema))
    return held


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_swap_holds_no_second_copy_and_restores_bit_for_bit(dtype):
    """The EMA beside its weights (model.ema_on_cpu off): during the swap the EMA object holds exactly the storages
    it held before (no backup of the trained weights anywhere), and swapping out restores every bit: trained
    weights and fp32 EMA, also for rounding ties, ±0, ±inf and a channels_last conv weight."""
    generator = torch.Generator().manual_seed(0)
    modules = {"lin": torch.nn.Linear(64, 32), "conv": torch.nn.Conv2d(8, 16, 3).to(memory_format=torch.channels_last)}
    for module in modules.values():
        module.to(dtype)
        for p in module.parameters():
            p.data.copy_(torch.randn(p.shape, generator=generator))
    ema = EMA(modules, decay=0.9, update_every=1, start_step=0)
    ema.update(0)
    for shadow in ema.shadow.values():
        shadow.copy_(tricky_fp32(tuple(shadow.shape), generator))
    exact = {k: v.clone() for k, v in ema.shadow.items()}
    trained = {k: bits(p) for k, p in ema.params.items()}
    before = reachable_storage_bytes(ema)
    with ema.applied():
        assert reachable_storage_bytes(ema) == before  # same storages, same sizes: nothing allocated to hold
        ema_now = ema.state_dict()["shadow"]
        for key, p in ema.params.items():
            assert torch.equal(bits(ema_now[key]), bits(exact[key]))  # the exact fp32 EMA, read while swapped
            if dtype == torch.float32:
                assert torch.equal(bits(p), bits(exact[key]))
                continue
            tie = (bits(exact[key]) & 0xFFFF) == 0x8000
            nearest = exact[key].to(torch.bfloat16)
            assert torch.equal(bits(p)[~tie], bits(nearest)[~tie])  # round to nearest, like a plain cast
            assert tie.sum() == 4 and bool((p.float()[tie].abs() > exact[key][tie].abs()).all())  # ties: away from 0
    assert reachable_storage_bytes(ema) == before
    for key, p in ema.params.items():
        assert torch.equal(bits(p), trained[key]) and torch.equal(bits(ema.shadow[key]), bits(exact[key]))
    assert modules["conv"].weight.is_contiguous(memory_format=torch.channels_last)


# --------------------------------------------------------------------------- warmup (model.ema_warmup)

def test_warmup_decay_curve_closed_form():
    from sdxl_ff.optim.ema import warmup_decay
    assert warmup_decay(0, 0.999, 1.0, 2 / 3) == 0.0  # the start is a copy
    assert warmup_decay(7, 0.999, 1.0, 2 / 3) == pytest.approx(1 - 8 ** (-2 / 3))  # = 0.75
    assert warmup_decay(7, 0.999, 1.0, 2 / 3) == pytest.approx(0.75)
    assert warmup_decay(99, 0.999, 2.0, 0.5) == pytest.approx(1 - (1 + 99 / 2) ** -0.5)
    assert warmup_decay(10**9, 0.999, 1.0, 2 / 3) == 0.999  # capped at ema_decay


def test_warmup_matches_diffusers_ema_model():
    """With update_every 1 the shadow follows diffusers' EMAModel(use_ema_warmup=True) step by step."""
    from diffusers.training_utils import EMAModel
    layer = linear(0.0)
    ours = EMA({"m": layer}, decay=0.99, update_every=1, start_step=0, warmup=(2.0, 0.75))
    reference = EMAModel(layer.parameters(), decay=0.99, use_ema_warmup=True, inv_gamma=2.0, power=0.75)
    g = torch.Generator().manual_seed(0)
    for step in range(0, 40):
        with torch.no_grad():
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        ours.update(step)
        reference.step(layer.parameters())
    for ref, key in zip(reference.shadow_params, ("m.weight", "m.bias"), strict=True):
        assert torch.allclose(ours.shadow[key], ref, rtol=1e-5, atol=1e-6)


def test_warmup_off_keeps_the_constant_decay_exactly():
    ema = EMA({"m": linear(1.0)}, decay=0.9999, update_every=10, start_step=0)
    ema.update(0)
    assert all(ema.decay_at(step) == 0.9999**10 for step in (10, 20, 10**6))
    warm = EMA({"m": linear(1.0)}, decay=0.9, update_every=2, start_step=3, warmup=(1.0, 1.0))
    warm.update(3)
    assert warm.decay_at(5) == pytest.approx((1 - 3**-1) ** 2)  # 2 steps since the start, d(2)**N


def per_tensor_update(shadow: dict[str, torch.Tensor], params: dict[str, torch.Tensor], weight: float) -> None:
    """The update as it was before the foreach version: one lerp_ per tensor (the reference)."""
    for key, p in params.items():
        shadow[key].lerp_(p.detach().to(shadow[key].device, torch.float32), weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_foreach_update_is_bit_identical_to_one_lerp_per_tensor(dtype, monkeypatch):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(2, 8), torch.nn.Linear(8, 5))
    model.to(dtype)
    monkeypatch.setattr("sdxl_ff.optim.ema.CHUNK_BYTES", 200)  # bf16: several conversion chunks, one tensor alone
    ema = EMA({"m": model}, decay=0.9, update_every=1, start_step=0)
    ema.update(0)
    reference = {k: v.clone() for k, v in ema.shadow.items()}
    for step in range(1, 5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        assert ema.update(step)
        per_tensor_update(reference, {f"m.{k}": p for k, p in model.named_parameters()}, 1 - 0.9)
        assert all(torch.equal(ema.shadow[k], reference[k]) for k in reference)
    assert not torch.equal(ema.shadow["m.0.weight"], model[0].weight.float())  # it averaged, not copied


def test_chunks_and_staged_copies_are_bit_identical():
    from sdxl_ff.optim.ema import chunk_bounds, lerp_from_device
    torch.manual_seed(1)
    params = [torch.randn(n).to(torch.bfloat16) for n in (3, 40, 1, 7, 100, 2)]
    shadows = [torch.randn(p.shape) for p in params]
    reference = [s.clone() for s in shadows]
    assert chunk_bounds(params, 4 * 44) == [(0, 3), (3, 4), (4, 5), (5, 6)]  # 44 elements fill one; 100 alone
    lerp_from_device(shadows, params, 0.125, chunk_bytes=4 * 44, pin=False)
    for ref, p in zip(reference, params, strict=True):
        ref.lerp_(p.to(torch.float32), 0.125)
    assert all(torch.equal(a, b) for a, b in zip(shadows, reference, strict=True))

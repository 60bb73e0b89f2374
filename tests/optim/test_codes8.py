"""codes8: torchao's 8-bit optimizer-state codes from two table lookups, against torchao's own quantisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchao.optim.quant_utils import quantize_8bit_with_qmap
from torchao.optim.subclass_8bit import get_qmap_signed, get_qmap_unsigned

from sdxl_ff.optim.codes8 import _tables, codes_of, thresholds

MAPS = {"signed": get_qmap_signed, "unsigned": get_qmap_unsigned}


def neighbours(values: np.ndarray, count: int = 3) -> np.ndarray:
    """Each float32 value and its `count` float32 neighbours on either side."""
    out, below, above = [values], values, values
    for _ in range(count):
        below, above = np.nextafter(below, np.float32(-np.inf)), np.nextafter(above, np.float32(np.inf))
        out += [below, above]
    return np.concatenate(out).astype(np.float32)


def torchao_codes(x: torch.Tensor, qmap: tuple[float, ...]) -> torch.Tensor:
    return quantize_8bit_with_qmap(x, torch.tensor(qmap, dtype=torch.float32)).int()


@pytest.mark.parametrize("kind", sorted(MAPS))
def test_each_threshold_is_where_torchaos_code_steps_up(kind):
    """t[c] is coded c + 1 by torchao, and the float32 just below it c: the thresholds are exact."""
    qmap = MAPS[kind]()
    t = thresholds(qmap)
    assert len(t) == 255 and np.all(np.diff(t) >= 0)
    at = torchao_codes(torch.from_numpy(t.copy()), qmap)
    below = torchao_codes(torch.from_numpy(np.nextafter(t, np.float32(-np.inf))), qmap)
    assert torch.equal(at, torch.arange(1, 256, dtype=torch.int32))
    assert torch.equal(below, torch.arange(0, 255, dtype=torch.int32))


@pytest.mark.parametrize("kind", sorted(MAPS))
def test_codes_equal_torchaos_at_every_edge_and_at_random(kind):
    """Every threshold, every map value and their float32 neighbours, and 2^20 random values of every magnitude in
    [-1, 1] (uniform, and 2^-U·30 for the map's fine codes near 0) get torchao's code; NaN gets torchao's 0.
    (Run once over every float32 in [-1, 1]: no code differs.)"""
    qmap = MAPS[kind]()
    generator = torch.Generator().manual_seed(0)
    low = -1.0 if kind == "signed" else 0.0
    uniform = torch.rand(1 << 20, generator=generator) * (1 - low) + low
    sign = 1 - 2 * torch.randint(0, 2, (1 << 20,), generator=generator) if kind == "signed" else 1
    tiny = sign * torch.pow(2.0, -30 * torch.rand(1 << 20, generator=generator))
    edges = neighbours(np.concatenate([thresholds(qmap), np.array(qmap, dtype=np.float32)]))
    edges = torch.from_numpy(edges[(edges >= low) & (edges <= 1)])
    x = torch.cat([edges, uniform, tiny.float(), torch.tensor([0.0, -0.0, 1.0, low])])
    assert torch.equal(codes_of(x, qmap), torchao_codes(x, qmap))
    nan = torch.tensor([float("nan"), -float("nan")])
    assert codes_of(nan, qmap).tolist() == torchao_codes(nan, qmap).tolist() == [0, 0]


def test_one_comparison_per_range_of_values_suffices():
    """Each range of float32 values sharing their top 16 bits holds at most one threshold of either map."""
    assert [_tables(get())[2] for get in MAPS.values()] == [1, 1]

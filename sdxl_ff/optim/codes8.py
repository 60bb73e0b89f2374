"""torchao's 8-bit optimizer-state codes, computed on the CPU with two table lookups instead of its search.

torchao quantises a scaled moment x (|x| <= 1) to a code of its 256-value map `qmap` in two stages (torchao
0.17, optim/quant_utils.py `quantize_8bit_with_qmap`): a branchless binary search finds the code c of the largest map
value <= x, then x moves up to c + 1 when `x - qmap[c] >= (qmap[c + 1] - qmap[c]) * 0.5` in float32. That is written
for the compiler (on CUDA it fuses into one kernel); eager on the CPU it is about 40 passes over the tensor.

Both stages together are a non-decreasing step function of x: the code is the number of thresholds t[c] <= x, where
t[c] is the smallest float32 in [qmap[c], qmap[c + 1]] at which torchao's own float32 comparison picks c + 1 (found
here by bisection over the float32 values, with torchao's expression). So no value is ever coded differently.
Counting thresholds is still a search; the top 16 bits of a float32 (sign, exponent, 7 mantissa bits) name a range
of values that holds at most `per_bucket` thresholds (1 for both of torchao's maps), so a 65,536-entry table gives
the code at the range's lowest value and `per_bucket` comparisons finish it: a handful of passes instead of about 40.
NaN (a diverged moment) gets code 0, as in torchao; ±inf cannot occur in a scaled moment (x = value / max |value| of
its block).

Checked against torchao's `quantize_8bit_with_qmap` on every float32 in [-1, 1] for both maps: no code differs (2.1e9
values, 8 CPU-minutes; tests/optim/test_codes8.py checks every threshold and its float32 neighbours, every map value
and random values).
"""

from __future__ import annotations

import functools

import numpy as np
import torch


def _float32(bits: np.ndarray) -> np.ndarray:
    return bits.astype(np.uint32).view(np.float32)


def _ordered(value: float) -> int:
    """An integer that orders float32 values as numbers do (two's complement of sign and magnitude)."""
    bits = int(np.array(value, dtype=np.float32).view(np.int32))
    return bits if bits >= 0 else -(bits & 0x7FFFFFFF)


def _from_ordered(key: int) -> np.float32:
    bits = key if key >= 0 else (-key) | 0x80000000
    return np.array(bits, dtype=np.uint32).view(np.float32)[()]


def _rounds_up(x: np.float32, down: np.float32, up: np.float32) -> bool:
    """torchao's rounding step, in float32: x, above map value `down`, takes the code of `up`."""
    return bool(np.float32(x - down) >= np.float32(np.float32(up - down) * np.float32(0.5)))


def thresholds(qmap: tuple[float, ...]) -> np.ndarray:
    """t[c] for c in 0..254: the smallest float32 that torchao codes as c + 1 or more (see the module docstring)."""
    values = np.array(qmap, dtype=np.float32)
    out = np.empty(len(values) - 1, dtype=np.float32)
    for c in range(len(values) - 1):
        down, up = values[c], values[c + 1]
        lo, hi = _ordered(down), _ordered(up)  # x = up always rounds up; find the first x that does
        while lo < hi:
            mid = (lo + hi) // 2
            if _rounds_up(_from_ordered(mid), down, up):
                hi = mid
            else:
                lo = mid + 1
        out[c] = _from_ordered(lo)
    return out


@functools.lru_cache(maxsize=4)
def _tables(qmap: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(code at the lowest value of each 16-bit range, thresholds padded with +inf, comparisons per range)."""
    t = thresholds(qmap)
    keys = np.arange(1 << 16, dtype=np.int64)
    ends = _float32(np.stack([keys << 16, (keys << 16) | 0xFFFF]))  # both ends of each range of float32 bits
    finite = np.isfinite(ends).all(axis=0)
    codes = np.searchsorted(t, np.where(finite, ends, 0), side="right")  # thresholds <= x: the code
    low, high = codes.min(axis=0), codes.max(axis=0)
    low[~finite] = 0  # NaN (and the unreachable ±inf): code 0, every comparison false
    per_bucket = int((high - low)[finite].max())
    padded = np.concatenate([t, np.full(per_bucket, np.inf, dtype=np.float32)])
    return torch.from_numpy(low.astype(np.int32)), torch.from_numpy(padded), per_bucket


def codes_of(scaled: torch.Tensor, qmap: tuple[float, ...]) -> torch.Tensor:
    """torchao's codes (int32) of a float32 CPU tensor of scaled moments, for the map `qmap` (a tuple, as torchao's
    `get_qmap_signed()` / `get_qmap_unsigned()` return it)."""
    low, padded, per_bucket = _tables(qmap)
    code = low.index_select(0, (scaled.view(torch.int32) >> 16) & 0xFFFF)
    for j in range(per_bucket):
        code += scaled >= padded.index_select(0, code + j if j else code)
    return code

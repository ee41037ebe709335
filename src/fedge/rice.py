"""Golomb-Rice coding of the positions (and signs) of a sparse update, as in Sattler et
al., "Robust and Communication-Efficient Federated Learning from Non-IID Data" (IEEE
TNNLS 2019): the gaps between the kept positions of a vector of density p are close to
geometric, so a Rice code — the gap's quotient by 2**b in unary, its remainder in b
bits — takes about log2(1/p) + 1.5 bits a position, against 16 or 32 for a plain index.

Two byte streams keep both sides vectorized: `fixed` holds one (sign bit, b remainder
bits) group per entry; `unary` holds each quotient as that many 1-bits and a 0-bit.
Both are padded with 0-bits to a whole byte, and `decode` accepts only that one
canonical form, so a node cannot hide bytes in a stream.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from fedge.errors import WeightsError

Int64s = npt.NDArray[np.int64]
Bools = npt.NDArray[np.bool_]
Bytes = npt.NDArray[np.uint8]


def rice_bits(total: int, count: int) -> int:
    """The Rice parameter b for `count` positions among `total`: log2 of the mean gap
    times ln 2, the optimum for geometric gaps — in integers, so every machine agrees."""
    if count <= 0:
        return 0
    return max(0, ((total - count) * 709 // (1024 * count)).bit_length() - 1)


def fixed_bytes(total: int, count: int) -> int:
    """The length of the `fixed` stream of `count` positions among `total`."""
    return -(-count * (rice_bits(total, count) + 1) // 8)


def unary_bytes(total: int, count: int) -> tuple[int, int]:
    """The shortest and longest `unary` stream of `count` positions among `total`: the
    quotients sum to at most (total - count) >> b, the gaps' sum shifted."""
    b = rice_bits(total, count)
    return -(-count // 8), -(-(count + ((total - count) >> b)) // 8)


def encode(positions: Int64s, negative: Bools, total: int) -> tuple[Bytes, Bytes]:
    """The (fixed, unary) streams of strictly increasing `positions` in 0..total-1."""
    count = len(positions)
    b = rice_bits(total, count)
    gaps = np.diff(positions, prepend=-1) - 1
    fixed = np.empty((count, b + 1), np.uint8)
    fixed[:, 0] = negative
    fixed[:, 1:] = (gaps[:, None] >> np.arange(b - 1, -1, -1)) & 1
    quotients = gaps >> b
    unary = np.ones(int(quotients.sum()) + count, np.uint8)
    unary[np.cumsum(quotients + 1) - 1] = 0
    return np.packbits(fixed.reshape(-1)), np.packbits(unary)


def decode(
    fixed: npt.NDArray[np.generic], unary: npt.NDArray[np.generic], count: int, total: int,
    *, source: str,
) -> tuple[Int64s, Bools]:  # fmt: skip
    """The positions and signs the streams hold, or `WeightsError` saying what is wrong:
    a stream not in its canonical form, or a position out of range."""
    b = rice_bits(total, count)
    if len(fixed) != fixed_bytes(total, count):
        raise WeightsError(
            f"{source}: the fixed stream of {count} entries takes {fixed_bytes(total, count)} "
            f"bytes; got {len(fixed)}"
        )
    bits = np.unpackbits(fixed.view(np.uint8))
    if bits[count * (b + 1) :].any():
        raise WeightsError(f"{source}: the fixed stream's padding bits must be 0")
    groups = bits[: count * (b + 1)].reshape(count, b + 1).astype(np.int64)
    negative = groups[:, 0].astype(bool)
    remainders = groups[:, 1:] @ (np.int64(1) << np.arange(b - 1, -1, -1, dtype=np.int64))
    ends = np.flatnonzero(np.unpackbits(unary.view(np.uint8)) == 0)
    if len(ends) < count:
        raise WeightsError(f"{source}: the unary stream holds {len(ends)} gaps; expected {count}")
    used = int(ends[count - 1]) + 1 if count else 0
    if -(-used // 8) != len(unary) or len(ends) - count != 8 * len(unary) - used:
        raise WeightsError(
            f"{source}: the unary stream must end with its {count}th gap (then 0-bits to a "
            f"byte): {used} bits are used of its {8 * len(unary)}"
        )
    quotients = np.diff(ends[:count], prepend=-1) - 1
    positions = np.cumsum((quotients << b) + remainders + 1) - 1
    if count and positions[-1] >= total:
        raise WeightsError(
            f"{source}: position {positions[-1]} is out of range; the float tensors have "
            f"{total} entries (0..{total - 1})"
        )
    return positions, negative

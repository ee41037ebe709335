"""SecAgg+ building blocks: keys, masks, secret shares, sealed shares and quantization.

Bell, Bengtsson, Gascón, Ghazi, Jagielski, Raykova, Tramèr, "Secure Single-Server
Aggregation with (Poly)Logarithmic Overhead", CCS 2020 (https://eprint.iacr.org/2020/704),
after Bonawitz et al., CCS 2017. Each client masks its quantized update with a self mask
(from a seed ``b``) and one pairwise mask per neighbour in a sparse graph (from an X25519
agreement), so the masks cancel in the sum. Both secrets are Shamir-shared among the
neighbours, so the server can remove the self masks of clients that sent their input and
the pairwise masks of those that dropped, never both for one client.

Keys and the PRG come from `cryptography` (X25519, HKDF-SHA256, AES-256-CTR, AES-GCM).
Shamir sharing is over the prime field of 2^521 - 1 with Python's integers: PyCryptodome's
GF(2^128) Shamir, in pure Python, took 14 ms to rebuild one secret, 1.4 s of a 100-client
round (docs/architecture.md). Masks live in the ring of integers modulo 2^32, which holds
a sum of 65,535 inputs of 16 bits. Everything here is pure: no rounds, no transports.
"""

from __future__ import annotations

import functools
import math
import os
import secrets
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

KEY = 32
"""Bytes of a public key, a seed, and a secret."""
PRIME = (1 << 521) - 1
"""The Shamir field: a Mersenne prime, comfortably above any 32-byte secret."""
SHARE = 1 + 66
"""Bytes of one Shamir share: its index (1-255) and its value below `PRIME`."""
NONCE = 12
SEALED = NONCE + 2 * 8 + 2 * SHARE + 16
"""Bytes of a sealed share pair: nonce, (sender, receiver, share of b, share of the
mask key) and the GCM tag."""
MAX_NEIGHBOURS = 255
"""Shamir share indices are one byte."""

Ring = npt.NDArray[np.uint32]
"""Vectors in the ring of integers modulo 2^32, where masks cancel."""
RING_BITS = 32


class SecAggError(ValueError):
    """A share, key or masked vector that cannot be what the protocol says it is."""


def derive(secret: bytes, *info: str) -> bytes:
    """32 bytes from `secret` for one purpose (HKDF-SHA256)."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY, salt=None, info="/".join(info).encode())
    return hkdf.derive(secret)


def private_key(seed: bytes) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(seed)


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def agree(key: X25519PrivateKey, public: bytes, label: str) -> bytes:
    """The secret two clients share: X25519, then HKDF bound to the round's `label`."""
    if len(public) != KEY:
        raise SecAggError(f"a public key has {KEY} bytes, got {len(public)}")
    try:
        shared = key.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as exc:  # e.g. a low-order point: the agreement would be all zeros
        raise SecAggError(f"unusable public key: {exc}") from None
    return derive(shared, "fedge-secagg", label)


def mask(seed: bytes, size: int) -> Ring:
    """`size` pseudorandom ring elements: the AES-256-CTR keystream of `seed`."""
    out = np.empty(size + 4, np.uint32)  # update_into wants a block's room to spare
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    encryptor.update_into(_zeros(4 * size), out.view(np.uint8).data)
    return out[:size]


@functools.lru_cache(maxsize=4)
def _zeros(size: int) -> bytes:
    return bytes(size)


def split(secret: bytes, threshold: int, count: int) -> list[bytes]:
    """`count` shares of a 32-byte `secret`, any `threshold` of which rebuild it."""
    if not 1 <= threshold <= count <= MAX_NEIGHBOURS:
        raise SecAggError(f"cannot split into {count} shares with threshold {threshold}")
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = []
    for x in range(1, count + 1):
        y = 0
        for c in reversed(coefficients):
            y = (y * x + c) % PRIME
        shares.append(bytes([x]) + y.to_bytes(SHARE - 1, "big"))
    return shares


def combine(shares: Sequence[bytes]) -> bytes:
    """The secret from shares (exactly the threshold's number of them): Lagrange
    interpolation at 0."""
    points = [(s[0], int.from_bytes(s[1:], "big")) for s in shares if len(s) == SHARE]
    xs = {x for x, _ in points}
    if len(points) != len(shares) or len(xs) != len(points) or 0 in xs:
        raise SecAggError(f"shares must be distinct, each of {SHARE} bytes with an index > 0")
    if any(y >= PRIME for _, y in points):
        raise SecAggError("a share's value is outside the field")
    secret = 0
    for xi, yi in points:
        num = den = 1
        for xj, _ in points:
            if xj != xi:
                num, den = num * -xj % PRIME, den * (xi - xj) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    if secret >> (8 * KEY):
        raise SecAggError("the shares do not rebuild a 32-byte secret")
    return secret.to_bytes(KEY, "big")


def seal(key: bytes, sender: int, receiver: int, b_share: bytes, key_share: bytes) -> bytes:
    """Both shares `sender` gives `receiver`, readable only with their agreed `key`."""
    nonce = os.urandom(NONCE)
    header = sender.to_bytes(8, "big") + receiver.to_bytes(8, "big")
    return nonce + AESGCM(key).encrypt(nonce, header + b_share + key_share, None)


def unseal(key: bytes, sealed: bytes, sender: int, receiver: int) -> tuple[bytes, bytes]:
    """(share of b, share of the mask key) that `sender` sealed for `receiver`."""
    if len(sealed) != SEALED:
        raise SecAggError(f"a sealed share has {SEALED} bytes, got {len(sealed)}")
    try:
        plain = AESGCM(key).decrypt(sealed[:NONCE], sealed[NONCE:], None)
    except Exception:  # InvalidTag: not sealed by this sender for this receiver
        raise SecAggError(f"the shares from client {sender} do not open") from None
    if plain[:16] != sender.to_bytes(8, "big") + receiver.to_bytes(8, "big"):
        raise SecAggError(f"the shares from client {sender} were sealed for another pair")
    return plain[16 : 16 + SHARE], plain[16 + SHARE :]


def neighbours(cids: Sequence[int], k: int, rng: np.random.Generator) -> dict[int, list[int]]:
    """A k-regular graph over `cids` (k even, k < len(cids)): a ring in a random order,
    each client joined to the k/2 nearest on each side (a Harary graph, as in SecAgg+)."""
    order = [int(c) for c in rng.permutation(list(cids))]
    n = len(order)
    if k >= n - 1:
        return {c: sorted(set(cids) - {c}) for c in cids}
    graph: dict[int, set[int]] = {c: set() for c in order}
    for i, c in enumerate(order):
        for step in range(1, k // 2 + 1):
            graph[c] |= {order[(i + step) % n], order[(i - step) % n]}
    return {c: sorted(graph[c]) for c in sorted(graph)}


def default_neighbours(n: int) -> int:
    """Bell et al.'s logarithmic degree: the even number nearest 2·log2(n), at most n - 1."""
    return min(n - 1, 2 * max(1, math.ceil(math.log2(max(n, 2)))))


def quantize(
    values: npt.NDArray[np.float64], clip: float, bits: int, rng: np.random.Generator
) -> Ring:
    """Values clipped to [-clip, clip], mapped onto 0 .. 2^bits - 1 with unbiased
    stochastic rounding, as ring elements."""
    levels = float((1 << bits) - 1)
    scaled = np.multiply(np.clip(values, -clip, clip) + clip, levels / (2 * clip))
    return np.floor(scaled + rng.random(scaled.shape)).astype(np.uint32)


def fold(total: Ring, values: Ring, sign: int = 1) -> None:
    """``total += sign * values`` modulo 2^32, in place."""
    (np.add if sign > 0 else np.subtract)(total, values, out=total)


def dequantize(total: Ring, count: int, clip: float, bits: int) -> npt.NDArray[np.float64]:
    """The mean of `count` quantized vectors from their sum."""
    levels = float((1 << bits) - 1)
    return total.astype(np.float64) / count * (2 * clip / levels) - clip

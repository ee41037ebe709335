"""Split one dataset's sample indices among simulated clients.

Every partitioner returns one ``int64`` index array per client, sorted ascending; the
arrays are disjoint and, together, cover every sample. Randomness comes only from a
``numpy.random.Generator`` seeded by ``seed``, so the same arguments give the same
partition on any machine — simulations stay reproducible (design principle 1).

The schemes are the standard ones of the FL literature, so results can be compared:

* ``iid`` — uniform random split, the "IID" baseline of McMahan et al. (2017).
* ``dirichlet`` — label skew drawn from a Dirichlet prior: Yurochkin et al., "Bayesian
  Nonparametric Federated Learning of Neural Networks" (ICML 2019); Hsu et al.,
  "Measuring the Effects of Non-Identical Data Distribution for Federated Visual
  Classification" (2019).
* ``shards`` — the "pathological non-IID" split of McMahan et al., "Communication-
  Efficient Learning of Deep Networks from Decentralized Data" (AISTATS 2017).
* ``by_group`` — a natural partition, e.g. one client per writer (LEAF, Caldas et al.
  2018), where the heterogeneity is real rather than simulated.
"""

from __future__ import annotations

import numbers

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["by_group", "dirichlet", "iid", "shards"]

Partition = list[NDArray[np.int64]]


def iid(num_samples: int, num_clients: int, seed: int) -> Partition:
    """Shuffle all indices and cut them into ``num_clients`` near-equal parts.

    Sizes differ by at most one, so no client is starved by chance.
    """
    num_samples = check_int("iid", "num_samples", num_samples, minimum=1)
    num_clients = check_int("iid", "num_clients", num_clients, minimum=1)
    seed = _check_seed("iid", seed)
    if num_samples < num_clients:
        raise ValueError(
            f"iid: expected num_samples >= num_clients so every client gets a sample, "
            f"got num_samples={num_samples} < num_clients={num_clients}"
        )
    rng = np.random.default_rng(seed)
    order = rng.permutation(num_samples).astype(np.int64)
    return [np.sort(part) for part in np.array_split(order, num_clients)]


def dirichlet(
    labels: ArrayLike,
    num_clients: int,
    alpha: float,
    seed: int,
    min_size: int = 1,
    *,
    max_tries: int = 100,
) -> Partition:
    """Label-skewed split: per class, client shares are drawn from ``Dir(alpha)``.

    For each class the samples are shuffled and divided among clients in proportions
    ``p ~ Dir(alpha, ..., alpha)`` (Yurochkin et al. 2019; Hsu et al. 2019). Small
    ``alpha`` (e.g. 0.1) gives each client few classes; large ``alpha`` approaches IID.
    Tiny ``alpha`` can leave a client (nearly) empty, which makes no sense to train on,
    so the whole draw is repeated until every client holds at least ``min_size``
    samples; after ``max_tries`` failed draws a ``ValueError`` explains what to change.
    """
    y = _check_labels("dirichlet", labels)
    num_clients = check_int("dirichlet", "num_clients", num_clients, minimum=1)
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise ValueError(f"dirichlet: expected alpha to be a number > 0, got {alpha!r}")
    alpha = float(alpha)
    if not (np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"dirichlet: expected alpha > 0 (finite), got alpha={alpha}")
    seed = _check_seed("dirichlet", seed)
    min_size = check_int("dirichlet", "min_size", min_size, minimum=0)
    max_tries = check_int("dirichlet", "max_tries", max_tries, minimum=1)
    if min_size * num_clients > y.size:
        raise ValueError(
            f"dirichlet: expected at least min_size * num_clients = {min_size} * "
            f"{num_clients} = {min_size * num_clients} samples, got {y.size}"
        )

    _, inverse = np.unique(y, return_inverse=True)
    inverse = inverse.reshape(-1)
    by_class = [np.flatnonzero(inverse == c) for c in range(int(inverse.max()) + 1)]
    rng = np.random.default_rng(seed)
    smallest = 0
    for _ in range(max_tries):
        buckets: list[list[NDArray[np.int64]]] = [[] for _ in range(num_clients)]
        for members in by_class:
            shuffled = rng.permutation(members)
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * shuffled.size).astype(np.int64)
            for client, part in enumerate(np.split(shuffled, cuts)):
                buckets[client].append(part)
        parts = [np.sort(np.concatenate(b)).astype(np.int64) for b in buckets]
        smallest = min(p.size for p in parts)
        if smallest >= min_size:
            return parts
    raise ValueError(
        f"dirichlet: expected every client to get at least min_size={min_size} samples, "
        f"but after {max_tries} draws with alpha={alpha} the smallest client still had "
        f"{smallest}; increase alpha, lower num_clients or min_size, or raise max_tries"
    )


def shards(
    labels: ArrayLike, num_clients: int, shards_per_client: int = 2, seed: int = 0
) -> Partition:
    """McMahan et al. (2017) pathological non-IID split.

    Sort the samples by label, cut them into ``num_clients * shards_per_client``
    contiguous shards of near-equal size, and hand each client ``shards_per_client``
    shards at random. When class sizes are multiples of the shard size every shard is
    single-label, so a client sees at most ``shards_per_client`` classes; otherwise a
    shard can straddle a class boundary, exactly as in the original experiment.
    """
    y = _check_labels("shards", labels)
    num_clients = check_int("shards", "num_clients", num_clients, minimum=1)
    shards_per_client = check_int("shards", "shards_per_client", shards_per_client, minimum=1)
    seed = _check_seed("shards", seed)
    num_shards = num_clients * shards_per_client
    if y.size < num_shards:
        raise ValueError(
            f"shards: expected at least num_clients * shards_per_client = {num_clients} * "
            f"{shards_per_client} = {num_shards} samples (one per shard), got {y.size}"
        )
    by_label = np.argsort(y, kind="stable").astype(np.int64)
    pieces = np.array_split(by_label, num_shards)
    rng = np.random.default_rng(seed)
    order = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
    return [np.sort(np.concatenate([pieces[s] for s in row])) for row in order]


def by_group(groups: ArrayLike) -> Partition:
    """One client per distinct value of ``groups`` (in sorted order of the values).

    Use it for data that is already federated by nature — a writer id, a hospital, a
    device serial — so clients keep their real, not simulated, heterogeneity.
    """
    g = np.asarray(groups)
    if g.ndim != 1:
        raise ValueError(f"by_group: expected a 1-D array of group ids, got shape {g.shape}")
    if g.size == 0:
        raise ValueError("by_group: expected at least one sample, got an empty array")
    _, inverse, counts = np.unique(g, return_inverse=True, return_counts=True)
    order = np.argsort(inverse.reshape(-1), kind="stable").astype(np.int64)
    return list(np.split(order, np.cumsum(counts)[:-1]))


def check_int(func: str, name: str, value: object, *, minimum: int) -> int:
    """`value` as an int, or a ValueError naming the function, the argument and the bound."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{func}: expected {name} to be an integer, got {value!r}")
    number = int(value)
    if number < minimum:
        raise ValueError(f"{func}: expected {name} >= {minimum}, got {name}={number}")
    return number


def _check_seed(func: str, seed: object) -> int:
    return check_int(func, "seed", seed, minimum=0)


def _check_labels(func: str, labels: ArrayLike) -> NDArray[np.generic]:
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"{func}: expected labels as a 1-D array, got shape {y.shape}")
    if y.size == 0:
        raise ValueError(f"{func}: expected at least one label, got an empty array")
    return y

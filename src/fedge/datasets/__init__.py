"""Partitioners and offline benchmark data for simulations and experiments.

Partitioners (``iid``, ``dirichlet``, ``shards``, ``by_group``) turn one dataset into
per-client index arrays; loaders (``load_digits``, ``load_mnist1d``, ``synthetic``)
provide data without network access.
"""

from fedge.datasets.loaders import (
    Device,
    load_digits,
    load_mnist1d,
    synthetic,
    train_test_split_devices,
)
from fedge.datasets.partition import by_group, dirichlet, iid, shards

__all__ = [
    "Device",
    "by_group",
    "dirichlet",
    "iid",
    "load_digits",
    "load_mnist1d",
    "shards",
    "synthetic",
    "train_test_split_devices",
]

"""scikit-learn linear models (``coef_``, ``intercept_``) as Weights."""

from __future__ import annotations

from typing import Any

import numpy as np

from fedge.weights import Weights

PARAMS = ("coef_", "intercept_")


def get_weights(model: Any) -> Weights:
    """The fitted parameters of a linear model, as float arrays."""
    return {name: np.array(getattr(model, name)) for name in PARAMS if hasattr(model, name)}


def set_weights(model: Any, weights: Weights) -> None:
    """Load parameters into a linear model so `predict` and warm starts use them."""
    for name in PARAMS:
        if name in weights:
            setattr(model, name, np.array(weights[name]))


def init_linear(model: Any, num_features: int, classes: np.ndarray) -> Weights:
    """Zero parameters for an unfitted linear classifier, so round 1 has a global model.

    Sets ``classes_`` too, which scikit-learn needs before `predict` or `partial_fit`.
    """
    n_out = 1 if len(classes) == 2 else len(classes)
    model.classes_ = np.array(classes)
    model.coef_ = np.zeros((n_out, num_features))
    model.intercept_ = np.zeros(n_out)
    return get_weights(model)

"""LaplaceRegression without the `laplace` extra: a clear ImportError naming it.

Runs in both environments without skipping: where laplace-torch is importable (.venv-laplace)
construction must work instead.
"""

import importlib

import pytest

from uq_box.methods.laplace import LaplaceClassification, LaplaceRegression
from uq_box.models import MLP


def laplace_importable() -> bool:
    try:
        importlib.import_module("laplace")
    except ImportError:
        return False
    return True


@pytest.mark.parametrize(
    ("method_cls", "n_inputs", "n_outputs"),
    [(LaplaceRegression, 1, 1), (LaplaceClassification, 2, 2)],
)
def test_construction_needs_the_laplace_extra(method_cls, n_inputs, n_outputs):
    network = MLP(n_inputs, [8], n_outputs)
    if laplace_importable():
        method = method_cls(network)
        assert method.la is None
        assert (method.subset_of_weights, method.hessian_structure) == ("last_layer", "kron")
    else:
        with pytest.raises(ImportError, match=r"uq_box\[laplace\]") as info:
            method_cls(network)
        assert "laplace-torch" in str(info.value)
        assert "torchvision" in str(info.value)

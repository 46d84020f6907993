"""The backbone table: every registry entry with ``backbone_table`` on every network of the zoo.

Each entry is built on each backbone of ``tests/backbones.py`` (residual and dense blocks, a U-Net,
two branches, a layer called twice, a transformer block, functional ops), with
``stochastic_module_names`` set to each of its ``placements`` (``inner``: a layer inside a block;
``all``), MC dropout with a dropout layer in front of the inner layer; it fits through
``lightning.Trainer`` (regression in float64, classification in float32) without a vmap fallback
or a slow-kernel warning, and ``predict_step`` keeps the prediction contract. For the deep
ensemble, SWAG and SG-MCMC the vectorized prediction also equals a loop over the members or the
fixed parameter samples and changes no parameter or buffer; Laplace fits its last-layer
approximation on the head users name.
"""

import warnings

import pytest
import torch
from backbones import BACKBONES, with_dropout
from conformance_cases import check_contract
from helpers import check_vectorized_equals_loop, quiet_trainer
from torch import nn

from uq_box.datamodules import ArrayDataModule
from uq_box.methods.deep_ensemble import DeepEnsemble
from uq_box.methods.registry import METHODS
from uq_box.methods.sampled import ParameterSampling

N_CLASSES, N_POINTS, N_PREDICT = 3, 24, 5
#: Lightning's own notes on a tiny CPU run; any other UserWarning (a vmap fallback, a
#: "performance drop" of an attention kernel vmap does not batch) fails the fit
LIGHTNING_NOTES = ".*(workers|logging interval|GPU|TPU|HPU|precision).*"


def _data(entry, regression):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((N_POINTS, *entry.input_shape), generator=gen)
    y = torch.randn(N_POINTS, 1, generator=gen) if regression else torch.arange(N_POINTS) % 3
    return ArrayDataModule(x, y, x[:8], y[:8], batch_size=8)


def _network(item, backbone):
    """The backbone at the entry's width; MC dropout gets dropout inside a block."""
    network = backbone.build(item.width(N_CLASSES))
    if item.dropout:
        (inner,) = backbone.placements["inner"]
        if inner.startswith("enc."):  # the transformer block's own dropout layers
            for module in network.enc.modules():
                if isinstance(module, nn.Dropout):
                    module.p = 0.3
        else:
            with_dropout(network, inner)
    return network


CASES = [
    pytest.param(
        item,
        name,
        placement,
        id=f"{item.name}-{name}" + (f"-{placement}" if placement else ""),
        marks=[pytest.mark.laplace] if item.laplace else [],
    )
    for item in METHODS
    if item.backbone_table
    for name in BACKBONES
    for placement in item.placements or (None,)
]


@pytest.mark.parametrize(("item", "backbone", "placement"), CASES)
def test_fits_and_predicts_the_contract_on_backbone(item, backbone, placement):
    entry = BACKBONES[backbone]
    regression = item.task == "regression"
    torch.manual_seed(0)
    overrides = dict(item.backbone_kwargs)
    if placement is not None:
        overrides["stochastic_module_names"] = entry.placements[placement]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "all": unsupported layers stay deterministic
        method = item.build(_network(item, entry), **overrides)
    dtype = torch.float64 if regression and not item.laplace else torch.float32
    method = method.to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # vectorized: no fallback, no slow kernel
        warnings.filterwarnings("ignore", message=LIGHTNING_NOTES)
        quiet_trainer(max_epochs=2, accelerator="cpu").fit(method, _data(entry, regression))
        gen = torch.Generator().manual_seed(2)
        x = torch.randn((N_PREDICT, *entry.input_shape), generator=gen, dtype=dtype)
        if isinstance(method, DeepEnsemble | ParameterSampling):
            atol = 1e-5 if regression else 1e-4
            preds = check_vectorized_equals_loop(method, x, atol=atol)
        else:
            preds = method.predict_step(x)
    check_contract(preds, item, N_PREDICT, N_CLASSES, dtype)
    if item.laplace:  # the last layer users name
        assert type(method.la).__name__ == "KronLLLaplace"
        assert method.la.model._last_layer_name == entry.placements["last"][0]

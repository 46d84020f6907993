"""Deep ensembles, SWAG, SG-MCMC and Laplace on every backbone of the zoo (tests/backbones.py).

- the zoo itself: every network runs in float32 and float64, traces with ``torch.fx``, and its
  placements name layers that exist;
- each method fits through ``lightning.Trainer`` and ``predict_step`` gives the prediction
  contract, changing no parameter and no buffer (BatchNorm statistics included);
- vectorized == loop: the one ``vmap(functional_call)`` call equals a Python loop over the
  members (``member(i)``) or the fixed parameter samples (``functional_call`` per sample), in
  eval mode and in training mode (per-sample BatchNorm statistics), in float64;
- forwards that vmap cannot vectorize (``.item()``, an in-place add onto an activation the samples
  share) fall back to the loop with one warning; tied weights stay tied in the ensemble;
- Laplace (last layer) on the zoo and on torchvision's models (Laplace environment).
"""

import warnings
from functools import partial

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from backbones import (
    BACKBONES,
    PLACEMENTS,
    TORCHVISION_CASES,
    TORCHVISION_PLACEMENTS,
    torchvision_backbones,
)
from helpers import check_vectorized_equals_loop, loop_outputs, quiet_trainer
from torch import nn
from torch.func import functional_call

from uq_box.datamodules import ArrayDataModule
from uq_box.methods import (
    DeepEnsembleClassification,
    DeepEnsembleRegression,
    SGMCMCClassification,
    SGMCMCRegression,
    SWAGClassification,
    SWAGRegression,
)

N_CLASSES, N_POINTS, N_PREDICT = 3, 24, 5
LAYERS = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
#: Lightning's own notes on a tiny CPU run; any other UserWarning (a vmap fallback, a
#: "performance drop" of an attention kernel vmap does not batch) fails the fit tests
LIGHTNING_NOTES = ".*(workers|logging interval|GPU|TPU|HPU|precision).*"


def _inputs(entry, n, dtype=torch.float64, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((n, *entry.input_shape), generator=gen).to(dtype)


def _data(entry, regression):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((N_POINTS, *entry.input_shape), generator=gen)
    if regression:
        y = torch.randn(N_POINTS, 1, generator=gen)
    else:
        y = torch.arange(N_POINTS) % N_CLASSES
    return x, ArrayDataModule(x, y, x[:8], y[:8], batch_size=8)


def _state(method):
    return {k: v.detach().clone() for k, v in method.state_dict().items()}


def _check_contract(preds, regression, num_samples, n=N_PREDICT):
    assert all(torch.isfinite(v).all() for v in preds.values()), preds
    if regression:
        for key in ("pred", "pred_uct", "epistemic_uct", "aleatoric_uct"):
            assert preds[key].shape == (n, 1), (key, preds[key].shape)
        assert preds["samples"].shape == (num_samples, n, 1)
        torch.testing.assert_close(
            preds["pred_uct"] ** 2, preds["aleatoric_uct"] ** 2 + preds["epistemic_uct"] ** 2
        )
        assert (preds["aleatoric_uct"] > 0).all()
    else:
        assert preds["pred"].shape == (n, N_CLASSES)
        torch.testing.assert_close(preds["pred"].sum(-1), torch.ones(n, dtype=preds["pred"].dtype))
        for key in ("pred_uct", "aleatoric_uct", "epistemic_uct"):
            assert preds[key].shape == (n,), (key, preds[key].shape)
        assert preds["logits"].shape == (num_samples, n, N_CLASSES)
    assert (preds["epistemic_uct"] > 0).any()  # the members / samples differ


# -- 0. the zoo ------------------------------------------------------------------------------------
@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_zoo_backbone_runs_traces_and_names_its_layers(backbone):
    entry = BACKBONES[backbone]
    assert set(entry.placements) == set(PLACEMENTS) and entry.placements["all"] is None
    for dtype in (torch.float32, torch.float64):
        torch.manual_seed(0)
        model = entry.build(4).to(dtype).eval()
        assert sum(p.numel() for p in model.parameters()) < 2000  # tiny
        x = _inputs(entry, 3, dtype)
        out = model(x)
        assert out.shape == (3, 4) and out.dtype == dtype and torch.isfinite(out).all()
        traced = torch.fx.symbolic_trace(model)
        torch.testing.assert_close(traced(x), out)
    modules = dict(model.named_modules())
    for label, names in entry.placements.items():
        for name in names or []:
            assert isinstance(modules.get(name), LAYERS), (label, name)


# -- 1. fit through the Trainer, predict the contract, vectorized == loop ---------------------------
def _ensemble(network, regression):
    method = DeepEnsembleRegression if regression else DeepEnsembleClassification
    return method(network, num_members=3, optimizer=partial(torch.optim.Adam, lr=1e-2))


def _swag(network, regression, names=None):
    method = SWAGRegression if regression else SWAGClassification
    return method(
        network,
        stochastic_module_names=names,
        optimizer=partial(torch.optim.Adam, lr=1e-2),
        max_num_samples=3,
        num_mc_samples_test=4,
    )


def _sgmcmc(network, regression, names=None):
    method = SGMCMCRegression if regression else SGMCMCClassification
    return method(network, stochastic_module_names=names, max_num_samples=4)


METHODS = {"ensemble": _ensemble, "swag": _swag, "sgmcmc": _sgmcmc}


# -- 2. every placement, eval and training mode, no Trainer ---------------------------------------
def _with_samples(method, steps=3, scale=0.05, seed=1):
    """Snapshots (SWAG) or kept samples (SG-MCMC) of randomly moved parameters."""
    gen = torch.Generator().manual_seed(seed)
    params = dict(method.model.named_parameters())
    for _ in range(steps):
        with torch.no_grad():
            for name in method.parameter_names:
                p = params[name]
                p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        if isinstance(method, SWAGRegression | SWAGClassification):
            method.collect_snapshot()
        else:
            method.collect_sample()
    return method


def _moved_statistics(model, entry):
    """A few training-mode forwards, so that BatchNorm's running statistics are not the init."""
    with torch.no_grad():
        model.train()
        for seed in range(3):
            model(_inputs(entry, 6, seed=10 + seed) * 2 + 1)


@pytest.mark.parametrize("method", ["swag", "sgmcmc"])
@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_sampled_vectorized_equals_loop(backbone, placement, method):
    entry = BACKBONES[backbone]
    torch.manual_seed(0)
    network = entry.build(N_CLASSES).double()
    _moved_statistics(network, entry)
    model = METHODS[method](network, False, names=entry.placements[placement])
    _with_samples(model)
    x = _inputs(entry, N_PREDICT)
    preds = check_vectorized_equals_loop(model, x, atol=1e-10)
    assert (preds["logits"][0] - preds["logits"][1]).abs().max() > 1e-6
    # training mode: each sample normalizes with the batch statistics, on its own copy of the
    # buffers; the model's buffers stay as they were
    model.train()
    theta = model.sample_parameters(None)
    before = _state(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        out = model.sample_outputs(x, None)
    loop = []
    for t in theta:
        params = {**dict(model.model.named_parameters()), **model.unflatten(t)}
        buffers = {k: v.clone() for k, v in model.model.named_buffers()}
        loop.append(functional_call(model.model, (params, buffers), (x,)))
    torch.testing.assert_close(out, torch.stack(loop), rtol=1e-6, atol=1e-10)
    for key, value in _state(model).items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_ensemble_vectorized_equals_members_in_both_modes(backbone):
    entry = BACKBONES[backbone]
    torch.manual_seed(0)
    method = DeepEnsembleClassification(entry.build(N_CLASSES), num_members=3).double()
    _moved_statistics(method.model, entry)
    x = _inputs(entry, N_PREDICT)
    check_vectorized_equals_loop(method, x, atol=1e-10)
    # training mode: batch statistics, and each member updates its own running statistics
    ensemble = method.model.train()
    members = [ensemble.member(i) for i in range(3)]
    assert all(m.training and p.dtype == torch.float64 for m in members for p in m.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        out = ensemble(x)
    torch.testing.assert_close(out, torch.stack([m(x) for m in members]), rtol=1e-6, atol=1e-10)
    for i, member in enumerate(members):
        stacked = ensemble.member(i).state_dict()
        for key, value in member.state_dict().items():
            torch.testing.assert_close(stacked[key], value, rtol=1e-6, atol=1e-10, msg=key)
    # gradients: each member's own
    out.square().sum().backward()
    for i, member in enumerate(members):
        member(x).square().sum().backward()
        for name, p in member.named_parameters():
            grad = ensemble.params[name.replace(".", ":")].grad[i]
            torch.testing.assert_close(grad, p.grad, rtol=1e-6, atol=1e-10, msg=name)


# -- 3. forwards vmap cannot vectorize, tied weights ------------------------------------------------
class ItemScaled(nn.Module):
    """Reads a Python number from an activation (``.item()``), after a BatchNorm."""

    def __init__(self, n_outputs: int) -> None:
        super().__init__()
        self.conv, self.norm = nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.head = nn.Linear(3, n_outputs)

    def forward(self, x):
        h = torch.relu(self.norm(self.conv(x)))
        scale = h.abs().max().item() + 1.0  # vmap: no .item() on a batched tensor
        return self.head(F.adaptive_avg_pool2d(h / scale, 1).flatten(1))


class InplaceShortcut(nn.Module):
    """``out += shortcut(x)`` as torchvision's ResNet has it."""

    def __init__(self, n_outputs: int) -> None:
        super().__init__()
        self.body, self.shortcut = nn.Linear(3, 6), nn.Linear(3, 6)
        self.head = nn.Linear(6, n_outputs)

    def forward(self, x):
        out = torch.tanh(self.body(x))
        out += self.shortcut(x)  # sampled shortcut: a batched operand, a shared target
        return self.head(out)


def test_unvectorizable_ensemble_falls_back_to_the_loop_once():
    torch.manual_seed(0)
    method = DeepEnsembleClassification(ItemScaled(N_CLASSES), num_members=3).double()
    ensemble = method.model.train()
    members = [ensemble.member(i) for i in range(3)]
    x = torch.randn(4, 1, 6, 6, dtype=torch.float64)
    with pytest.warns(UserWarning, match="3 members cannot run as one torch.func.vmap.*item"):
        out = ensemble(x)
    torch.testing.assert_close(out, torch.stack([m(x) for m in members]))
    # the failed attempt's BatchNorm update was undone: one update per member, as in the loop
    for i, member in enumerate(members):
        for key, value in member.state_dict().items():
            torch.testing.assert_close(ensemble.member(i).state_dict()[key], value, msg=key)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per mode
        ensemble(x)
    with pytest.warns(UserWarning, match="in eval mode"):
        preds = method.predict_step(x)
    torch.testing.assert_close(
        preds["logits"], torch.stack([ensemble.member(i).eval()(x) for i in range(3)])
    )


@pytest.mark.parametrize("cls", [SWAGRegression, SGMCMCRegression])
@pytest.mark.parametrize("network", [ItemScaled, InplaceShortcut])
def test_unvectorizable_sampled_forward_falls_back_to_the_loop_once(network, cls):
    torch.manual_seed(0)
    names = ["shortcut"] if network is InplaceShortcut else ["conv"]  # before the .item()
    model = _with_samples(cls(network(2).double(), stochastic_module_names=names))
    x = torch.randn(4, 3, dtype=torch.float64)
    if network is ItemScaled:
        x = torch.randn(4, 1, 6, 6, dtype=torch.float64)
    theta = model.sample_parameters(3)
    model.sample_parameters = lambda num_samples=None: theta
    with pytest.warns(UserWarning, match="3 samples cannot run as one torch.func.vmap"):
        preds = model.predict_step(x)
    torch.testing.assert_close(preds, model.predictive(loop_outputs(model, x, theta)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.predict_step(x)


def test_ensemble_keeps_tied_weights_tied():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.out = nn.Linear(4, 4), nn.Linear(4, 4)
            self.out.weight = self.inp.weight  # one weight, two layers

        def forward(self, x):
            return self.out(torch.tanh(self.inp(x)))

    torch.manual_seed(0)
    members = [Tied().double() for _ in range(2)]
    method = DeepEnsembleRegression(members, num_members=None)
    assert sorted(method.model.params) == ["inp:bias", "inp:weight", "out:bias"]
    x = torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(method.model(x), torch.stack([m(x) for m in members]))
    member = method.model.member(1)
    assert member.out.weight is member.inp.weight
    torch.testing.assert_close(member(x), members[1](x))


# -- 4. Laplace and torchvision's models (the Laplace environment has torchvision) -----------------
def _laplace_fit(entry, regression, last, epochs=2, n=N_POINTS):
    from uq_box.methods.laplace import LaplaceClassification, LaplaceRegression

    torch.manual_seed(0)
    method = (LaplaceRegression if regression else LaplaceClassification)(
        entry.build(1 if regression else N_CLASSES), num_mc_samples_test=4
    )
    x, dm = _data(entry, regression)
    dm = ArrayDataModule(x[:n], dm.split("train")[1][:n], batch_size=8)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=LIGHTNING_NOTES)
        quiet_trainer(max_epochs=epochs, accelerator="cpu").fit(method, dm)
    assert type(method.la).__name__ == "KronLLLaplace"
    assert method.la.model._last_layer_name == last  # the head users name
    preds = method.predict_step(_inputs(entry, N_PREDICT, torch.float32))
    assert all(torch.isfinite(v).all() for v in preds.values())
    if regression:
        for key in ("pred", "pred_uct", "epistemic_uct", "aleatoric_uct"):
            assert preds[key].shape == (N_PREDICT, 1), key
        assert preds["samples"].shape == (4, N_PREDICT, 1)
    else:
        _check_contract(preds, False, 4)


TORCHVISION = sorted(TORCHVISION_PLACEMENTS)


@pytest.mark.laplace
@pytest.mark.parametrize("regression", [True, False], ids=["regression", "classification"])
@pytest.mark.parametrize("backbone", TORCHVISION)
def test_last_layer_laplace_on_torchvision(backbone, regression):
    entry = torchvision_backbones()[backbone]
    _laplace_fit(entry, regression, entry.placements["last"][0], epochs=1, n=8)


def _nonzero(network):
    """ViT's head starts at zero: every sample would give the same logits."""
    with torch.no_grad():
        for p in network.parameters():
            if not p.any():
                p.normal_(0.0, 0.1)
    return network


@pytest.mark.laplace
@pytest.mark.parametrize(
    ("backbone", "placement"), [c for c in TORCHVISION_CASES if c != ("resnet18", "all")]
)
def test_sampled_vectorized_equals_loop_on_torchvision(backbone, placement):
    entry = torchvision_backbones()[backbone]
    torch.manual_seed(0)
    network = _nonzero(entry.build(N_CLASSES)).double()
    _moved_statistics(network, entry)
    model = _swag(network, False, names=entry.placements[placement])
    _with_samples(model, scale=0.01)
    x = _inputs(entry, 2)
    if placement == "shortcut":  # torchvision's `out += identity`: in place, loops
        with pytest.warns(UserWarning, match="samples cannot run as one torch.func.vmap"):
            preds = check_vectorized_equals_loop(model, x, atol=1e-8)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            preds = check_vectorized_equals_loop(model, x, atol=1e-8)
    assert (preds["logits"][0] - preds["logits"][1]).abs().max() > 1e-8


@pytest.mark.laplace
@pytest.mark.parametrize("backbone", TORCHVISION)
def test_ensemble_on_torchvision(backbone):
    entry = torchvision_backbones()[backbone]
    torch.manual_seed(0)
    network = _nonzero(entry.build(N_CLASSES))
    for module in network.modules():  # the members' loop reference draws no dropout masks
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    method = DeepEnsembleClassification(network, num_members=2)
    ensemble = method.model.train()
    members = [ensemble.member(i) for i in range(2)]
    x = _inputs(entry, 4, torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        out = ensemble(x)
        # train mode: BatchNorm on 4 rows through 121 layers amplifies float32 round-off of the
        # batched kernels (densenet121 differed by 1.6e-4 on this machine's CPU)
        torch.testing.assert_close(out, torch.stack([m(x) for m in members]), atol=1e-3, rtol=1e-3)
        check_vectorized_equals_loop(method, x, atol=1e-5)

"""Conversion of deterministic networks into partially or fully Bayesian ones."""

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.distributions import Laplace

from uq_box.nn import (
    BayesianConv1d,
    BayesianConv2d,
    BayesianLinear,
    parameter_layers,
    select_modules,
    to_bayesian,
)
from uq_box.nn.layers import _BayesianLayer


def _mlp_bn():
    """Parameter-owning layers: 0 (Linear), 1 (BatchNorm1d), 3 (Linear), 5 (Linear)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)
    )


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = nn.Sequential(
            nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16),
            nn.ReLU(), nn.Linear(16, 2),
        )  # fmt: skip

    def forward(self, x):
        return self.model(x)


def _kinds(model):
    return {name: type(m) for name, m in model.named_modules() if name}


# ----------------------------------------------------------------------------- selection


def test_parameter_layers_count_batchnorm():
    model = _mlp_bn()
    assert [name for name, _ in parameter_layers(model)] == ["0", "1", "3", "5"]
    # a BatchNorm without affine parameters owns none
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2, affine=False), nn.Linear(2, 1))
    assert [name for name, _ in parameter_layers(model)] == ["0", "2"]


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        ([-1], ["5"]),
        ([0, -1], ["0", "5"]),
        ([2], ["3"]),  # the BatchNorm is index 1
        ([-2, 0], ["3", "0"]),
        (["3"], ["3"]),
        (["0", "5"], ["0", "5"]),
        ([-1, 3], ["5"]),  # the same layer twice
        ((0,), ["0"]),
    ],
    ids=str,
)
def test_select_modules(names, expected):
    assert select_modules(_mlp_bn(), names) == expected


@pytest.mark.parametrize(
    ("names", "converted"), [([-1], ["5"]), ([0, -1], ["0", "5"]), ([2], ["3"])]
)
def test_int_indices_convert_the_right_layers(names, converted):
    model = to_bayesian(_mlp_bn(), names)
    kinds = _kinds(model)
    for name in ("0", "3", "5"):
        expected = BayesianLinear if name in converted else nn.Linear
        assert kinds[name] is expected, name
    assert kinds["1"] is nn.BatchNorm1d


def test_dotted_string_names():
    net = to_bayesian(_Net(), ["model.6"])
    assert isinstance(net.model[6], BayesianLinear)
    assert sum(isinstance(m, _BayesianLayer) for m in net.modules()) == 1
    net = to_bayesian(_Net(), ["model.0", "model.4"])
    assert isinstance(net.model[0], BayesianLinear) and isinstance(net.model[4], BayesianLinear)
    assert type(net.model[2]) is nn.Linear and type(net.model[6]) is nn.Linear
    assert to_bayesian(_Net(), [-1]).model[6].__class__ is BayesianLinear


def test_none_converts_all_and_warns_about_batchnorm():
    with pytest.warns(UserWarning, match=r"1 \(BatchNorm1d\)"):
        model = to_bayesian(_mlp_bn(), None)
    kinds = _kinds(model)
    assert kinds["0"] is kinds["3"] is kinds["5"] is BayesianLinear
    assert kinds["1"] is nn.BatchNorm1d


def test_none_without_warning_when_everything_is_supported():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        net = to_bayesian(_Net())
    assert sum(isinstance(m, BayesianLinear) for m in net.modules()) == 4


def test_none_on_model_without_supported_layers_is_an_error():
    with pytest.raises(ValueError, match="stochastic_module_names"):
        to_bayesian(nn.Sequential(nn.LayerNorm(4), nn.ReLU()), None)


# ----------------------------------------------------------------------------- weights


def test_keep_weights_as_posterior_means_and_rho_init():
    model = _mlp_bn()
    old = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="BatchNorm1d"):
        to_bayesian(model, None, posterior_rho_init=-3.5)
    for name in ("0", "3", "5"):
        layer, ref = model.get_submodule(name), old.get_submodule(name)
        torch.testing.assert_close(layer.weight_mu, ref.weight, rtol=0, atol=0)
        torch.testing.assert_close(layer.bias_mu, ref.bias, rtol=0, atol=0)
        assert (layer.weight_rho == -3.5).all() and (layer.bias_rho == -3.5).all()
        assert layer.weight_sigma.sub(math.log1p(math.exp(-3.5))).abs().max() < 1e-7
    # deterministic layers are untouched
    torch.testing.assert_close(model[1].weight, old[1].weight, rtol=0, atol=0)


def test_reinitialize_when_not_keeping_weights():
    model = _mlp_bn()
    old = copy.deepcopy(model)
    torch.manual_seed(123)
    to_bayesian(model, [-1], keep_weights=False, posterior_rho_init=-4.0)
    layer = model[5]
    assert not torch.equal(layer.weight_mu, old[5].weight)
    assert not torch.equal(layer.bias_mu, old[5].bias)
    bound = 1.0 / math.sqrt(8)
    assert layer.weight_mu.abs().max() <= bound and layer.bias_mu.abs().max() <= bound
    assert (layer.weight_rho == -4.0).all() and (layer.bias_rho == -4.0).all()


def test_converted_network_with_tiny_sigma_reproduces_the_original():
    """Stride, padding, dilation, groups and bias survive the conversion."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1, groups=2),
        nn.ReLU(),
        nn.Conv2d(4, 4, (3, 2), padding=(2, 1), dilation=2, bias=False),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding="same"),
        nn.Flatten(),
        nn.Linear(4 * 5 * 5, 3),
    ).double()
    x = torch.randn(3, 2, 9, 9, dtype=torch.float64)
    expected = model(x)
    to_bayesian(model, None, posterior_rho_init=-60.0)
    conv = model[0]
    assert isinstance(conv, BayesianConv2d)
    assert (conv.stride, conv.padding, conv.groups) == ((2, 2), (1, 1), 2)
    assert model[2].bias_mu is None and model[2].dilation == (2, 2)
    assert model[4].padding == "same"
    torch.testing.assert_close(model(x), expected, rtol=1e-10, atol=1e-10)


def test_conv1d_conversion():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(1, 2, 3), nn.ReLU(), nn.Conv1d(2, 2, 3))
    x = torch.randn(2, 1, 9)
    expected = model(x)
    to_bayesian(model, [0], posterior_rho_init=-60.0)
    assert isinstance(model[0], BayesianConv1d) and type(model[2]) is nn.Conv1d
    torch.testing.assert_close(model(x), expected)


def test_prior_and_estimator_are_passed_on():
    model = to_bayesian(_mlp_bn(), [-1], prior=Laplace(0.0, 0.5), estimator="local")
    layer = model[5]
    assert layer.estimator == "local"
    assert layer.prior.family is Laplace and layer.prior.scale.item() == 0.5


def test_float64_model_stays_float64():
    model = _mlp_bn().double()
    with pytest.warns(UserWarning, match="BatchNorm1d"):
        to_bayesian(model, None, prior=0.5)
    for name in ("0", "3", "5"):
        layer = model.get_submodule(name)
        for tensor in (*layer.parameters(), *layer.buffers()):
            assert tensor.dtype == torch.float64
            assert tensor.device == torch.device("cpu")
    model.eval()
    out = model(torch.randn(4, 3, dtype=torch.float64))
    assert out.dtype == torch.float64
    assert model[5].kl.dtype == torch.float64


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("names", "error", "pattern"),
    [
        ([], ValueError, "empty"),
        ([4], ValueError, "4"),
        ([-5], ValueError, "-5"),
        (["nope"], ValueError, "nope"),
        (["model.6"], ValueError, "model.6"),
        (["2"], ValueError, "ReLU"),  # a module without parameters
        (["1"], ValueError, "BatchNorm1d"),  # parameters, unsupported type
        ([1], ValueError, "BatchNorm1d"),
        ([0, "5"], TypeError, r"\[0, '5'\]"),
        ([True], TypeError, "True"),
        ([0.5], TypeError, "0.5"),
        (-1, TypeError, "-1"),
        ("5", TypeError, "'5'"),
        ({0, 1}, TypeError, "stochastic_module_names"),
    ],
    ids=str,
)
def test_selection_errors(names, error, pattern):
    model = _mlp_bn()
    before = _kinds(model)
    with pytest.raises(error, match="stochastic_module_names") as info:
        to_bayesian(model, names)
    assert info.match(pattern)
    assert _kinds(model) == before  # nothing converted


@pytest.mark.parametrize(
    ("layer", "type_name"),
    [(nn.LayerNorm(4), "LayerNorm"), (nn.Embedding(4, 4), "Embedding"), (nn.GRU(4, 4), "GRU")],
)
def test_unsupported_layer_types(layer, type_name):
    model = nn.Sequential(nn.Linear(4, 4), layer)
    with pytest.raises(ValueError, match="stochastic_module_names") as info:
        to_bayesian(model, ["1"])
    assert info.match(type_name)
    with pytest.raises(ValueError, match=type_name):
        to_bayesian(nn.Sequential(nn.Linear(4, 4), layer), [-1])


def test_linear_subclass_is_not_silently_converted():
    class MyLinear(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(nn.Linear(2, 2), MyLinear(2, 2))
    with pytest.raises(ValueError, match="MyLinear"):
        to_bayesian(model, [-1])


def test_already_bayesian_layer_is_an_error():
    model = to_bayesian(_mlp_bn(), [-1])
    with pytest.raises(ValueError, match="stochastic_module_names") as info:
        to_bayesian(model, [-1])
    assert info.match("5") and info.match("Bayesian")
    with pytest.raises(ValueError, match="already"):
        to_bayesian(model, ["5"])
    # the other layers can still be converted, and the index still counts the Bayesian one
    to_bayesian(model, [0])
    assert isinstance(model[0], BayesianLinear)


def test_reflect_padding_is_an_error():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match="stochastic_module_names") as info:
        to_bayesian(model, [0])
    assert info.match("reflect") and info.match("padding_mode")
    assert type(model[0]) is nn.Conv2d


def test_failed_conversion_leaves_the_model_unchanged():
    # BUG: to_bayesian converts layers one by one and only checks padding_mode inside the loop,
    # so an error on a later layer leaves the earlier ones already replaced (half-converted
    # model). Expected: validate everything first, raise, and leave the model untouched.
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect")
    )
    with pytest.raises(ValueError, match="reflect"):
        to_bayesian(model, [0, 1])
    assert type(model[0]) is nn.Conv2d


def test_bare_layer_is_converted_or_rejected():
    # BUG: to_bayesian(nn.Linear(3, 2)) selects the root module (name "") and does
    # setattr(model, "", new): the Linear gains a child named "" and is returned unchanged, a
    # deterministic layer. Expected: a clear error (the root cannot be replaced in place) or a
    # returned BayesianLinear.
    layer = nn.Linear(3, 2)
    try:
        out = to_bayesian(layer)
    except (ValueError, TypeError) as err:
        assert "stochastic_module_names" in str(err) or "model" in str(err)
    else:
        assert isinstance(out, BayesianLinear)


def test_shared_layer_is_converted_everywhere_or_rejected():
    # BUG: a module used twice (weight tying) is listed once by named_modules, so only its first
    # name is replaced; the second use silently stays a deterministic nn.Linear with the same
    # weights. Expected: both uses become the same Bayesian layer, or a clear error.
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    try:
        to_bayesian(model)
    except (ValueError, TypeError) as err:
        assert "stochastic_module_names" in str(err)
    else:
        assert isinstance(model[2], _BayesianLayer)
        assert model[0] is model[2]


@pytest.mark.parametrize("estimator", ["lcoal", "", "flip"])
def test_bad_estimator(estimator):
    model = _mlp_bn()
    with pytest.raises(ValueError, match="estimator") as info:
        to_bayesian(model, [-1], estimator=estimator)
    assert info.match(repr(estimator))
    assert type(model[5]) is nn.Linear
    with pytest.raises(ValueError, match="estimator"):
        BayesianLinear(2, 2, estimator=estimator)


@pytest.mark.parametrize("rho", [float("nan"), float("inf"), -float("inf")])
def test_bad_posterior_rho_init(rho):
    model = _mlp_bn()
    with pytest.raises(ValueError, match="posterior_rho_init"):
        to_bayesian(model, [-1], posterior_rho_init=rho)
    assert type(model[5]) is nn.Linear


@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_bad_num_kl_samples(bad):
    with pytest.raises(ValueError, match="num_kl_samples"):
        to_bayesian(_mlp_bn(), [-1], num_kl_samples=bad)


def test_converted_model_trains():
    """One gradient step on the ELBO pieces reaches mu and rho of the converted layers."""
    torch.manual_seed(0)
    model = to_bayesian(_Net(), [0, -1], posterior_rho_init=-3.0)
    x, y = torch.randn(16, 2), torch.randn(16, 2)
    loss = F.mse_loss(model(x), y) + model.model[0].kl / 1000
    loss.backward()
    for layer in (model.model[0], model.model[6]):
        assert layer.weight_mu.grad.abs().sum() > 0 and layer.weight_rho.grad.abs().sum() > 0

"""MC dropout layers (masks as a batch dimension) and the vectorized ensemble, by numbers."""

import math

import pytest
import torch
from torch import nn

from uq_box.models import CNN, MLP
from uq_box.nn import MCDropout, StackedEnsemble, sample_forward, to_mc_dropout


# -- to_mc_dropout ---------------------------------------------------------------------------------
def test_to_mc_dropout_replaces_every_dropout_keeping_p():
    model = nn.Sequential(
        nn.Linear(3, 8),
        nn.Dropout(0.2),
        nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Dropout(0.4)),
        nn.Linear(8, 1),
    )
    converted = to_mc_dropout(model)
    assert converted is model  # in place
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert [type(m) for m in dropouts] == [MCDropout, MCDropout]
    assert [m.p for m in dropouts] == [0.2, 0.4]
    # weights untouched, converting twice is harmless
    state = {k: v.clone() for k, v in model.state_dict().items()}
    to_mc_dropout(model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())

    cnn = to_mc_dropout(CNN(channels=(4, 8), hidden=16, dropout_p=0.25))
    ps = [m.p for m in cnn.modules() if isinstance(m, MCDropout)]
    assert ps == [0.25, 0.25, 0.25]
    assert not any(type(m) is nn.Dropout for m in cnn.modules())


@pytest.mark.parametrize(
    "model",
    [
        nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1)),
        MLP(3, [8, 8], 1, dropout_p=0.0),
    ],
    ids=["no_dropout", "only_p0"],
)
def test_to_mc_dropout_without_active_dropout_fails(model):
    with pytest.raises(ValueError, match="`model`"):
        to_mc_dropout(model)


# -- MCDropout -------------------------------------------------------------------------------------
def _counting_hook(log):
    def hook(module, inputs, output):
        log.append(inputs[0].shape[0])

    return hook


def test_layers_before_first_dropout_run_once():
    torch.manual_seed(0)
    model = to_mc_dropout(
        nn.Sequential(
            nn.Linear(3, 8),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(8, 8),
            nn.Dropout(0.5),
            nn.Linear(8, 2),
        )
    ).eval()
    before, between, after = [], [], []
    model[0].register_forward_hook(_counting_hook(before))
    model[3].register_forward_hook(_counting_hook(between))
    model[5].register_forward_hook(_counting_hook(after))
    x = torch.randn(5, 3)
    out = sample_forward(model, x, 11)
    assert out.shape == (11, 5, 2)
    assert before == [5]  # once, on the N points
    assert between == [55] and after == [55]  # once, on the S * N folded batch
    assert (out.std(0) > 0).all()  # the S masks differ


def test_mc_dropout_outside_sampling_is_plain_dropout():
    x = torch.randn(64, 32)
    layer, reference = MCDropout(0.3), nn.Dropout(0.3)
    layer.eval()
    assert torch.equal(layer(x), x)  # identity in eval mode
    layer.train()
    torch.manual_seed(3)
    got = layer(x)
    torch.manual_seed(3)
    expected = reference.train()(x)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_mc_dropout_inside_sampling_drops_in_eval_mode(p):
    torch.manual_seed(0)
    layer = MCDropout(p).eval()
    num_samples, n, d = 20, 50, 40
    x = torch.rand(n, d) + 0.5  # no zeros of its own
    out = sample_forward(layer, x, num_samples)
    assert out.shape == (num_samples, n, d)
    zeros = out == 0
    total = zeros.numel()
    rate = zeros.float().mean().item()
    assert abs(rate - p) < 5 * math.sqrt(p * (1 - p) / total), rate
    survivors = x.expand(num_samples, n, d)[~zeros]
    torch.testing.assert_close(out[~zeros], survivors / (1 - p))
    # each sample has its own mask
    assert not torch.equal(zeros[0], zeros[1])
    # and the layer's own mode is not changed
    assert not layer.training


# -- StackedEnsemble -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_stacked_forward_equals_members(kind):
    torch.manual_seed(0)
    if kind == "mlp":
        members = [MLP(3, [16, 16], 2) for _ in range(4)]
        x = torch.randn(10, 3)
    else:
        members = [CNN(channels=(4, 8), hidden=16) for _ in range(3)]
        x = torch.randn(6, 1, 8, 8)
    ensemble = StackedEnsemble(members).eval()
    out = ensemble(x)
    expected = torch.stack([m.eval()(x) for m in members])
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    # and gradients reach every member's slice of the stacked parameters
    out.sum().backward()
    assert all((p.grad.flatten(1).abs().sum(1) > 0).all() for p in ensemble.parameters())


def test_stacked_eval_mode_reaches_the_members():
    """``ensemble.eval()`` must switch off the members' dropout and freeze their BatchNorm."""
    torch.manual_seed(0)
    members = [MLP(2, [16], 1, dropout_p=0.5) for _ in range(3)]
    ensemble = StackedEnsemble(members).eval()
    x = torch.randn(5, 2)
    torch.testing.assert_close(ensemble(x), torch.stack([m.eval()(x) for m in members]))

    members = [
        nn.Sequential(nn.Linear(2, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
        for _ in range(2)
    ]
    for m in members:  # give the running statistics non-trivial values
        m.train()(3 * torch.randn(64, 2) + 1)
    ensemble = StackedEnsemble(members).eval()
    buffers = {k: v.clone() for k, v in ensemble.state_dict().items() if "running" in k}
    out = ensemble(torch.randn(16, 2))
    assert all(torch.equal(ensemble.state_dict()[k], v) for k, v in buffers.items())
    x = torch.randn(16, 2)
    torch.testing.assert_close(ensemble(x), torch.stack([m.eval()(x) for m in members]))
    assert out.shape == (2, 16, 1)


def test_stacked_rejects_members_that_differ_only_in_parameter_free_layers():
    """Same parameter shapes but another activation is another architecture, not member 0's."""
    members = [MLP(2, [8], 1, activation_fn=nn.ReLU()), MLP(2, [8], 1, activation_fn=nn.Tanh())]
    with pytest.raises(ValueError, match="`members`"):
        StackedEnsemble(members)

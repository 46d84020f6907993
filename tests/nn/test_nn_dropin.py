"""``import uq_box.nn as vinn``: the drop-in flow of the vinn package (seed 002)."""

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.distributions import Laplace, Normal
from torch.utils.data import DataLoader, TensorDataset

import uq_box.nn as vinn
from uq_box.datamodules import DigitsDatamodule
from uq_box.nn import BayesianConv2d, BayesianLinear, kl_divergence


class LeNet(vinn.Module):  # class LeNet(nn.Module):
    """The seed's LeNet, sized for 8x8 digits (padding keeps 8x8 -> 4x4 -> 2x2)."""

    def __init__(self):
        super().__init__()
        self.conv1 = vinn.Conv2d(1, 6, 3, padding=1)  # nn.Conv2d(1, 6, 3, padding=1)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = vinn.Conv2d(6, 16, 3, padding=1)  # nn.Conv2d(6, 16, 3, padding=1)
        self.fc1 = vinn.Linear(64, 120)  # nn.Linear(64, 120)
        self.fc2 = vinn.Linear(120, 84)  # nn.Linear(120, 84)
        self.fc3 = vinn.Linear(84, 10, prior=Normal(0, 1))  # nn.Linear(84, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        # the seed's x.view(-1, 256): torch may hand back channels-last convolution outputs for
        # single-channel inputs (plain nn.Conv2d too), which view() refuses
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def test_lenet_elbo_training_loop_on_digits():
    torch.manual_seed(0)
    dm = DigitsDatamodule(val_fraction=0.0, seed=0)
    data_loader = DataLoader(TensorDataset(dm.X_train, dm.Y_train), batch_size=32, shuffle=True)
    net = LeNet()
    # the seed's loop (lr 0.01 instead of 0.001 to get there in a few epochs)
    criterion = nn.CrossEntropyLoss(reduction="sum")
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
    beta = torch.tensor(1.0 / len(data_loader))
    kl_start = net.kl.item()
    for _epoch in range(4):
        for inputs, targets in data_loader:
            optimizer.zero_grad()
            outputs = net(inputs)
            nll = criterion(outputs, targets)
            kl = net.kl
            elbo = nll + beta * kl
            elbo.backward()
            optimizer.step()
    assert net.kl.item() < kl_start  # the KL term did its work
    torch.testing.assert_close(net.kl, kl_divergence(net))
    layers = [net.conv1, net.conv2, net.fc1, net.fc2, net.fc3]
    torch.testing.assert_close(net.kl, sum(layer.kl for layer in layers))
    with torch.no_grad():
        # every forward pass is one predictive sample; S of them at once with sample_forward
        probs = vinn.sample_forward(net, dm.X_test, 20).softmax(-1).mean(0)
        single = net(dm.X_test).argmax(-1)
    accuracy = (probs.argmax(-1) == dm.Y_test).float().mean().item()
    assert accuracy > 0.8, accuracy
    assert (single == dm.Y_test).float().mean().item() > 0.7


def test_seed_constructor_flow():
    layer = vinn.Linear(4, 5, posterior=Normal, prior=Normal(0, 1))
    assert isinstance(layer, BayesianLinear) and isinstance(
        layer, vinn.Module | vinn.BayesianModule
    )
    assert layer.estimator == "local"  # vinn's default: the local reparameterization trick
    assert layer(torch.randn(3, 4)).shape == (3, 5)
    assert layer.kl.shape == () and layer.kl > 0
    laplace = vinn.Linear(4, 5, prior=Laplace(0.0, 0.1), estimator="flipout")
    assert laplace.prior.family is Laplace and laplace.estimator == "flipout"
    with pytest.raises(ValueError, match="posterior.*Laplace"):
        vinn.Linear(4, 5, posterior=Laplace)
    with pytest.raises(ValueError, match="prior"):
        vinn.Linear(4, 5, prior=Normal(0.0, -1.0, validate_args=False))
    with pytest.raises(ValueError, match="estimator"):
        vinn.Conv2d(1, 2, 3, estimator="exact")


def test_torch_nn_arguments_and_shapes():
    x = torch.randn(2, 4, 9, 9)
    plain = nn.Conv2d(4, 6, 3, 2, 1, 1, 2, False)  # positional as torch.nn
    bayes = vinn.Conv2d(4, 6, 3, 2, 1, 1, 2, False)
    assert isinstance(bayes, BayesianConv2d) and bayes.bias_mu is None
    assert bayes(x).shape == plain(x).shape
    assert (bayes.stride, bayes.padding, bayes.groups) == ((2, 2), (1, 1), 2)
    assert vinn.Conv1d(2, 3, 3)(torch.randn(4, 2, 7)).shape == (4, 3, 5)
    assert vinn.Conv3d(2, 3, 2)(torch.randn(4, 2, 3, 3, 3)).shape == (4, 3, 2, 2, 2)
    assert vinn.Linear(3, 2, False).bias_mu is None
    with pytest.raises(ValueError, match="padding_mode"):
        vinn.Conv2d(1, 2, 3, padding_mode="reflect")
    double = vinn.Linear(3, 2, dtype=torch.float64)
    assert double.weight_mu.dtype == torch.float64 and double.prior.loc.dtype == torch.float64
    assert vinn.Conv2d(1, 2, 3, device="cpu", dtype=torch.float64).weight_rho.dtype == torch.float64


@pytest.mark.parametrize("estimator", ["local", "reparameterization", "flipout"])
def test_zero_variance_drop_in_equals_torch_nn(estimator):
    torch.manual_seed(0)
    pairs = [
        (nn.Linear(5, 3), vinn.Linear(5, 3, posterior_rho_init=-40.0, estimator=estimator)),
        (
            nn.Conv2d(2, 4, 3, padding=1),
            vinn.Conv2d(2, 4, 3, padding=1, posterior_rho_init=-40.0, estimator=estimator),
        ),
    ]
    for plain, bayes in pairs:
        with torch.no_grad():
            bayes.weight_mu.copy_(plain.weight)
            bayes.bias_mu.copy_(plain.bias)
        x = torch.randn(4, 5) if isinstance(plain, nn.Linear) else torch.randn(4, 2, 5, 5)
        torch.testing.assert_close(bayes(x), plain(x), rtol=1e-5, atol=1e-6)


def test_module_kl_sums_nested_layers_and_is_zero_without():
    class Net(vinn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(vinn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4))
            self.head = vinn.Linear(4, 2, prior=Laplace(0.0, 0.5))

        def forward(self, x):
            return self.head(self.body(x))

    net = Net()
    assert isinstance(net, nn.Module)
    torch.testing.assert_close(net.kl, net.body[0].kl + net.head.kl)
    torch.testing.assert_close(net.kl, kl_divergence(net))
    net.kl.backward()
    assert net.head.weight_rho.grad is not None and net.body[2].weight.grad is None

    class Plain(vinn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)

    assert Plain().kl.item() == 0.0

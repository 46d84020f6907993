"""The small CNN backbone: shapes, parameters, training on digits, Bayesian conversion."""

import time

import pytest
import torch
from torch import nn

from uq_box.datamodules.classification import DigitsDatamodule
from uq_box.models.cnn import CNN
from uq_box.nn import BayesianConv2d, BayesianLinear, sample_forward, to_bayesian


def test_output_shapes():
    torch.manual_seed(0)
    cnn = CNN()
    for n in (1, 7, 64):
        assert cnn(torch.rand(n, 1, 8, 8)).shape == (n, 10)
    x = torch.rand(5, 1, 8, 8)
    assert torch.allclose(cnn(x.flatten(1)), cnn(x))  # flattened digits work too
    other = CNN(in_channels=3, n_classes=4, channels=(8, 8, 8), hidden=16, image_size=16)
    assert other(torch.rand(2, 3, 16, 16)).shape == (2, 4)
    odd = CNN(channels=(4,), image_size=7)  # 7 -> 3 after one pooling
    assert odd(torch.rand(3, 1, 7, 7)).shape == (3, 10)
    with pytest.raises(ValueError, match="flattened input"):
        cnn(torch.rand(2, 10))


def test_parameter_count_and_structure():
    cnn = CNN()
    # conv 1->16 (3x3), conv 16->32 (3x3), linear 32*2*2->64, linear 64->10
    expected = (9 * 16 + 16) + (16 * 9 * 32 + 32) + (128 * 64 + 64) + (64 * 10 + 10)
    assert expected == 13706
    assert sum(p.numel() for p in cnn.parameters()) == expected
    kinds = [type(m) for m in cnn.model]
    assert kinds.count(nn.Conv2d) == 2 and kinds.count(nn.Linear) == 2
    assert kinds.count(nn.Flatten) == 1 and kinds.count(nn.Dropout) == 3
    for i, kind in enumerate(kinds):  # every activation is followed by dropout (MC dropout)
        if kind is nn.ReLU:
            assert kinds[i + 1] is nn.Dropout
    assert kinds[-1] is nn.Linear


def test_dropout():
    torch.manual_seed(0)
    cnn = CNN(dropout_p=0.5)
    x = torch.rand(4, 1, 8, 8)
    cnn.eval()
    assert torch.equal(cnn(x), cnn(x))
    cnn.train()
    assert not torch.equal(cnn(x), cnn(x))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"in_channels": 0}, "in_channels"),
        ({"n_classes": 0}, "n_classes"),
        ({"channels": ()}, "channels"),
        ({"channels": (16, 0)}, "channels"),
        ({"hidden": 0}, "hidden"),
        ({"dropout_p": 1.0}, "dropout_p"),
        ({"channels": (4, 4, 4, 4), "image_size": 8}, "image_size"),
    ],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        CNN(**kwargs)


def test_trains_on_digits():
    torch.manual_seed(0)
    dm = DigitsDatamodule(batch_size=32, val_fraction=0.0, seed=0)
    cnn = CNN()
    optimizer = torch.optim.Adam(cnn.parameters(), lr=3e-3)
    start = time.perf_counter()
    for _ in range(12):
        for batch in dm.train_dataloader():
            loss = nn.functional.cross_entropy(cnn(batch["input"]), batch["target"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    elapsed = time.perf_counter() - start
    cnn.eval()
    with torch.no_grad():
        accuracy = (cnn(dm.X_test).argmax(1) == dm.Y_test).float().mean().item()
    assert accuracy > 0.9, accuracy
    assert elapsed < 15.0, elapsed


def test_to_bayesian_and_sample_forward():
    torch.manual_seed(0)
    cnn = CNN(dropout_p=0.1)
    x = torch.rand(6, 1, 8, 8)
    with torch.no_grad():
        before = cnn.eval()(x)
    to_bayesian(cnn, None)
    kinds = [type(m) for m in cnn.modules()]
    assert nn.Conv2d not in kinds and nn.Linear not in kinds
    assert kinds.count(BayesianConv2d) == 2 and kinds.count(BayesianLinear) == 2
    out = sample_forward(cnn, x, 4)
    assert out.shape == (4, 6, 10)
    assert not torch.allclose(out[0], out[1])  # different weight samples
    # the posterior means are the pretrained weights, with small initial sigma
    assert (out.mean(0) - before).abs().max() < 0.5
    cnn.train()  # dropout on top of the weight samples, on the folded [S * N] batch
    assert sample_forward(cnn, x.flatten(1), 3).shape == (3, 6, 10)
    last = to_bayesian(CNN(), [-1])
    assert sum(isinstance(m, BayesianLinear) for m in last.modules()) == 1
    assert sample_forward(last, x, 5).shape == (5, 6, 10)


def test_batch_norm_option():
    torch.manual_seed(0)
    cnn = CNN(batch_norm=True)
    kinds = [type(m) for m in cnn.model]
    assert kinds.count(nn.BatchNorm2d) == 2 and kinds.count(nn.BatchNorm1d) == 1
    for i, kind in enumerate(kinds):  # BatchNorm right after its layer, before the ReLU
        if kind in (nn.BatchNorm2d, nn.BatchNorm1d):
            assert kinds[i - 1] in (nn.Conv2d, nn.Linear) and kinds[i + 1] is nn.ReLU
    assert cnn(torch.rand(5, 1, 8, 8)).shape == (5, 10)
    assert nn.BatchNorm2d not in [type(m) for m in CNN().modules()]  # off by default

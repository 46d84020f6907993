"""In-memory loaders and array data modules."""

import math

import lightning as L  # noqa: N812
import numpy as np
import pytest
import torch
from torch import nn

from uq_box.datamodules import ArrayDataModule, InMemoryLoader


def _indexed(n):
    """Inputs whose first column is the row index; targets 10 x the index."""
    x = torch.arange(n, dtype=torch.float32).unsqueeze(-1).repeat(1, 2)
    y = 10.0 * torch.arange(n, dtype=torch.float32).unsqueeze(-1)
    return x, y


def _epoch_indices(loader):
    batches = list(loader)
    for batch in batches:
        assert set(batch) == {"input", "target"}
        torch.testing.assert_close(batch["target"][:, 0], 10.0 * batch["input"][:, 0])
    return batches, torch.cat([b["input"][:, 0] for b in batches]).long()


# ----------------------------------------------------------------------------- InMemoryLoader


@pytest.mark.parametrize(("n", "batch_size"), [(30, 7), (28, 7), (5, 10), (1, 1), (13, 1)])
def test_loader_covers_every_index_once_per_epoch(n, batch_size):
    x, y = _indexed(n)
    loader = InMemoryLoader(x, y, batch_size=batch_size, shuffle=True, seed=3)
    assert len(loader) == math.ceil(n / batch_size)
    orders = []
    for _ in range(3):
        batches, order = _epoch_indices(loader)
        assert len(batches) == len(loader)
        sizes = [len(b["input"]) for b in batches]
        assert sizes[:-1] == [batch_size] * (len(sizes) - 1)
        assert sizes[-1] == n - batch_size * (len(sizes) - 1)  # last partial batch kept
        assert sorted(order.tolist()) == list(range(n))
        orders.append(order)
    if n >= 10:
        assert not torch.equal(orders[0], orders[1]) and not torch.equal(orders[1], orders[2])
        assert not torch.equal(orders[0], torch.arange(n))


def test_loader_without_shuffle_keeps_order():
    x, y = _indexed(10)
    loader = InMemoryLoader(x, y, batch_size=4)
    for _ in range(2):
        batches, order = _epoch_indices(loader)
        assert [len(b["input"]) for b in batches] == [4, 4, 2]
        assert order.tolist() == list(range(10))


def test_loader_permutations_are_seeded():
    x, y = _indexed(50)
    a = InMemoryLoader(x, y, batch_size=8, shuffle=True, seed=1)
    b = InMemoryLoader(x, y, batch_size=8, shuffle=True, seed=1)
    c = InMemoryLoader(x, y, batch_size=8, shuffle=True, seed=2)
    for _ in range(2):
        order_a, order_b = _epoch_indices(a)[1], _epoch_indices(b)[1]
        assert torch.equal(order_a, order_b)
    assert not torch.equal(_epoch_indices(c)[1], _epoch_indices(a)[1])


def test_loader_shuffle_is_uniform_enough():
    """Every index lands in the first batch about equally often over many epochs."""
    n, epochs = 20, 2000
    x, y = _indexed(n)
    loader = InMemoryLoader(x, y, batch_size=5, shuffle=True)
    counts = torch.zeros(n)
    for _ in range(epochs):
        first = next(iter(loader))["input"][:, 0].long()
        counts[first] += 1
    expected = epochs * 5 / n  # 500, binomial std ~ 19
    assert (counts - expected).abs().max() < 5 * math.sqrt(expected * (1 - 5 / n))


@pytest.mark.parametrize("bad", [0, -3])
def test_loader_bad_batch_size(bad):
    with pytest.raises(ValueError, match="batch_size"):
        InMemoryLoader(*_indexed(4), batch_size=bad)


# ----------------------------------------------------------------------------- ArrayDataModule


def test_dtypes_and_shapes():
    rng = np.random.default_rng(0)
    x64 = rng.normal(size=(12, 3))
    dm = ArrayDataModule(x64, rng.normal(size=12))
    assert dm.X_train.dtype == torch.float64 and dm.Y_train.dtype == torch.float64
    assert dm.Y_train.shape == (12, 1)  # 1-D regression targets become a column
    np.testing.assert_array_equal(dm.X_train.numpy(), x64)

    dm = ArrayDataModule(x64.astype(np.float32), rng.normal(size=(12, 2)).astype(np.float16))
    assert dm.X_train.dtype == torch.float32 and dm.Y_train.dtype == torch.float32
    assert dm.Y_train.shape == (12, 2)

    bf16 = torch.randn(12, 3).to(torch.bfloat16)
    dm = ArrayDataModule(bf16, torch.randn(12).half())
    assert dm.X_train.dtype == torch.float32 and dm.Y_train.dtype == torch.float32
    torch.testing.assert_close(dm.X_train, bf16.float(), rtol=0, atol=0)

    labels = rng.integers(0, 3, size=12)
    dm = ArrayDataModule(x64.astype(np.float32), labels)
    assert dm.Y_train.dtype == torch.int64 and dm.Y_train.shape == (12,)
    np.testing.assert_array_equal(dm.Y_train.numpy(), labels)

    images = torch.randn(12, 1, 8, 8)
    dm = ArrayDataModule(images, torch.randint(0, 10, (12,)), batch_size=5)
    assert dm.X_train.shape == (12, 1, 8, 8)
    batch = next(iter(dm.train_dataloader()))
    assert batch["input"].shape == (5, 1, 8, 8) and batch["target"].shape == (5,)


def test_splits_and_loaders():
    x, y = _indexed(23)
    dm = ArrayDataModule(
        x, y, X_val=x[:5] + 100, y_val=y[:5] + 1000, X_test=x[:9], y_test=y[:9],
        batch_size=4, eval_batch_size=3, seed=7,
    )  # fmt: skip
    assert dm.has_split("train") and dm.has_split("val") and dm.has_split("test")
    train = dm.train_dataloader()
    assert train.shuffle and train.batch_size == 4 and len(train) == 6
    _, order = _epoch_indices(train)
    assert sorted(order.tolist()) == list(range(23)) and order.tolist() != list(range(23))
    val = dm.val_dataloader()
    assert not val.shuffle and len(val) == 2
    assert torch.cat([b["input"][:, 0] for b in val]).tolist() == list(range(100, 105))
    test = dm.test_dataloader()
    assert len(test) == 3 and [len(b["input"]) for b in test] == [3, 3, 3]
    predict = dm.predict_dataloader()
    assert torch.equal(torch.cat([b["input"] for b in predict]), x[:9])
    torch.testing.assert_close(dm.X_val, x[:5] + 100)
    torch.testing.assert_close(dm.Y_test, y[:9])


def test_missing_splits():
    dm = ArrayDataModule(*_indexed(6))
    assert not dm.has_split("val") and not dm.has_split("test")
    assert list(dm.val_dataloader()) == []
    with pytest.raises(ValueError, match="'test'"):
        dm.test_dataloader()
    with pytest.raises(ValueError, match="'test'"):
        dm.predict_dataloader()
    with pytest.raises(ValueError, match="'val'"):
        dm.X_val  # noqa: B018


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"X_train": np.zeros((5, 2)), "y_train": np.zeros(4)}, "X_train.*y_train"),
        ({"X_val": np.zeros((3, 2)), "y_val": np.zeros(2)}, "X_val.*y_val"),
        ({"X_val": np.zeros((3, 2))}, "X_val.*y_val"),
        ({"y_test": np.zeros(3)}, "y_test.*X_test"),
        ({"X_train": np.array([[0.0, np.nan]] * 5)}, "X_train.*non-finite"),
        ({"X_train": np.array([[0.0, np.inf]] * 5)}, "X_train.*non-finite"),
        ({"y_train": np.array([0.0, 0.0, -np.inf, 0.0, 0.0])}, "y_train.*non-finite"),
        ({"X_test": np.full((2, 2), np.nan), "y_test": np.zeros(2)}, "X_test"),
        ({"X_val": np.zeros((2, 2)), "y_val": torch.tensor([0.0, float("nan")])}, "y_val"),
        ({"X_train": np.zeros((0, 2)), "y_train": np.zeros(0)}, "X_train.*empty"),
        ({"X_train": 3.0, "y_train": 1.0}, "X_train"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": -1}, "batch_size"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"eval_batch_size": 0}, "eval_batch_size"),
    ],
    ids=lambda v: str(v)[:40] if isinstance(v, str) else None,
)
def test_value_errors_name_the_argument(kwargs, pattern):
    args = {"X_train": np.zeros((5, 2)), "y_train": np.zeros(5)}
    args.update(kwargs)
    with pytest.raises(ValueError, match=pattern):
        ArrayDataModule(**args)


@pytest.mark.parametrize(
    ("value", "pattern"),
    [
        ("abc", "X_train"),
        (object(), "X_train"),
        ({"a": 1}, "X_train"),
        ([[1.0, 2.0], [3.0]], "X_train"),
        (np.zeros((5, 2), dtype=bool), "X_train.*bool"),
        (np.zeros((5, 2), dtype=complex), "X_train"),
    ],
    ids=["str", "object", "dict", "ragged", "bool", "complex"],
)
def test_type_errors_name_the_argument(value, pattern):
    with pytest.raises(TypeError, match=pattern):
        ArrayDataModule(value, np.zeros(5))


def test_missing_train_split_is_an_error():
    with pytest.raises(ValueError, match="X_train"):
        ArrayDataModule(None, None)


# ----------------------------------------------------------------------------- with Lightning


class _Recorder(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(2, 1)
        self.seen: list[list[int]] = []

    def on_train_epoch_start(self):
        self.seen.append([])

    def training_step(self, batch, batch_idx):
        self.seen[-1].extend(batch["input"][:, 0].long().tolist())
        return nn.functional.mse_loss(self.layer(batch["input"]), batch["target"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-6)


def test_trainer_sees_every_point_once_per_epoch(tmp_path):
    x, y = _indexed(37)
    dm = ArrayDataModule(x, y, batch_size=8)
    module = _Recorder()
    trainer = L.Trainer(
        max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    assert trainer.num_training_batches == 5
    assert len(module.seen) == 3
    for epoch in module.seen:
        assert sorted(epoch) == list(range(37))
    assert module.seen[0] != module.seen[1] != module.seen[2]

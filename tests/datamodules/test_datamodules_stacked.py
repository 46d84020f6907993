import numpy as np
import pytest
import torch

from uq_box.datamodules import ArrayDataModule
from uq_box.datamodules.stacked import StackedDataModule, kfold_datamodules


def _arrays(n=23):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 3)).astype("float32"), rng.normal(size=n).astype("float32")


def test_each_run_gets_the_batches_of_its_own_loader():
    x, y = _arrays()
    modules = [ArrayDataModule(x + k, y - k, batch_size=5, seed=10 * k) for k in range(3)]
    stacked = StackedDataModule(modules).train_dataloader()
    singles = [m.train_dataloader() for m in modules]
    assert len(stacked) == len(singles[0]) == 5
    for _ in range(2):  # two epochs: new permutations, the same on both sides
        for batch, *own in zip(stacked, *singles, strict=True):
            assert batch["input"].shape[:2] == (3, len(own[0]["input"]))
            for k, single in enumerate(own):
                torch.testing.assert_close(batch["input"][k], single["input"])
                torch.testing.assert_close(batch["target"][k], single["target"])


def test_kfold_folds_partition_the_rows():
    x, y = _arrays(23)
    modules = kfold_datamodules(x, y, num_folds=5, seed=1, X_test=x[:4], y_test=y[:4])
    fold = 23 // 5
    validated = np.concatenate([m.X_val.numpy() for m in modules])
    assert len(validated) == 5 * fold and len(np.unique(validated[:, 0])) == 5 * fold
    for module in modules:
        assert len(module.X_train) == 23 - fold and len(module.X_val) == fold
        train, val = set(module.X_train[:, 0].tolist()), set(module.X_val[:, 0].tolist())
        assert not train & val and len(train | val) == 23
    data = StackedDataModule(modules)
    assert data.split("train")[0].shape == (5, 23 - fold, 3)
    assert data.split("test")[1].shape == (5, 4, 1)
    assert [m.seed for m in modules] == [1, 2, 3, 4, 5]


def test_bad_input_names_the_argument():
    x, y = _arrays(20)
    with pytest.raises(ValueError, match="`num_folds`"):
        kfold_datamodules(x, y, num_folds=1)
    with pytest.raises(ValueError, match="same number of rows"):
        StackedDataModule([ArrayDataModule(x, y), ArrayDataModule(x[:-1], y[:-1])])
    with pytest.raises(ValueError, match="'val' split"):
        StackedDataModule([ArrayDataModule(x, y, x, y), ArrayDataModule(x, y)])
    with pytest.raises(TypeError, match="`datamodules`"):
        StackedDataModule([])
    with pytest.raises(ValueError, match="no 'test' split"):
        StackedDataModule([ArrayDataModule(x, y)]).test_dataloader()

import hashlib
import io
import shutil

import numpy as np
import pytest
import torch

from uq_box.datamodules.uci import (
    UCI_DATASETS,
    UCIRegressionDatamodule,
    download_uci,
    load_uci_split,
    uci_info,
    verify_uci,
)

SIZES = {  # name: (train, test, features), from the data README
    "bostonHousing": (455, 51, 13),
    "yacht": (277, 31, 6),
    "naval-propulsion-plant": (10741, 1193, 16),
    "protein-tertiary-structure": (41157, 4573, 9),
}


def _raw(root, name, split):
    folder = root / name
    data = np.loadtxt(folder / "data.txt")
    features = np.loadtxt(folder / "index_features.txt", dtype=int, ndmin=1)
    target = int(np.loadtxt(folder / "index_target.txt"))
    train = np.loadtxt(folder / f"index_train_{split}.txt", dtype=int)
    test = np.loadtxt(folder / f"index_test_{split}.txt", dtype=int)
    return data, features, target, train, test


@pytest.mark.parametrize("name", ["bostonHousing", "yacht"])
def test_split_indices_shapes_disjoint(uci_root, name):
    data, features, target, train, test = _raw(uci_root, name, 3)
    split = load_uci_split(uci_root, name, 3)
    n_train, n_test, d = SIZES[name]
    assert split.x_train.shape == (n_train, d) and split.y_train.shape == (n_train,)
    assert split.x_test.shape == (n_test, d) and split.y_test.shape == (n_test,)
    np.testing.assert_array_equal(split.train_index, train)
    np.testing.assert_array_equal(split.test_index, test)
    assert not set(train) & set(test)
    assert sorted(set(train) | set(test)) == list(range(len(data)))
    assert target not in features


@pytest.mark.parametrize("name", ["yacht", "naval-propulsion-plant"])
def test_standardization_uses_training_statistics(uci_root, name):
    data, features, target, train, test = _raw(uci_root, name, 0)
    split = load_uci_split(uci_root, name, 0)
    x, y = data[:, features], data[:, target]
    mean, std = x[train].mean(0), x[train].std(0)
    std[np.ptp(x[train], 0) == 0] = 1.0
    np.testing.assert_allclose(split.x_test, (x[test] - mean) / std)
    np.testing.assert_allclose(split.y_test, (y[test] - y[train].mean()) / y[train].std())
    np.testing.assert_allclose(split.y_test * split.y_std + split.y_mean, y[test])
    assert np.isfinite(split.x_train).all()
    varying = np.ptp(x[train], 0) > 0
    np.testing.assert_allclose(split.x_train.mean(0), 0.0, atol=1e-8)
    np.testing.assert_allclose(split.x_train.std(0)[varying], 1.0)
    if name == "naval-propulsion-plant":  # columns 8 and 11 are constant: std guarded to 1
        assert sorted(np.flatnonzero(~varying)) == [8, 11]
        assert (split.x_std[~varying] == 1.0).all()
        np.testing.assert_allclose(split.x_train[:, ~varying], 0.0, atol=1e-9)


def test_validation_is_the_end_of_the_training_file(uci_root):
    _, _, _, train, _ = _raw(uci_root, "yacht", 1)
    split = load_uci_split(uci_root, "yacht", 1, val_fraction=0.2)
    n_val = round(0.2 * len(train))
    np.testing.assert_array_equal(split.val_index, train[-n_val:])
    np.testing.assert_array_equal(split.train_index, train[:-n_val])
    np.testing.assert_allclose(split.x_train.mean(0), 0.0, atol=1e-8)


def test_datamodule(uci_root):
    dm = UCIRegressionDatamodule("yacht", split=2, root=uci_root, batch_size=50, val_fraction=0.1)
    assert dm.X_train.shape == (249, 6) and dm.Y_train.shape == (249, 1)
    assert dm.X_val.shape == (28, 6) and dm.X_test.shape == (31, 6)
    assert dm.X_train.dtype == torch.float64 or dm.X_train.dtype == torch.float32
    assert (dm.n_splits, dm.n_hidden, dm.n_epochs) == (20, 50, 40)
    batch = next(iter(dm.train_dataloader()))
    assert batch["input"].shape == (50, 6)
    mean, std = dm.to_original_units(dm.Y_test, torch.ones_like(dm.Y_test))
    _, _, target, _, test = _raw(uci_root, "yacht", 2)
    raw = np.loadtxt(uci_root / "yacht" / "data.txt")[test, target]
    np.testing.assert_allclose(mean.squeeze(-1).numpy(), raw, rtol=1e-6)
    assert torch.allclose(std, torch.full_like(std, dm.y_std))
    assert dm.log_likelihood_offset() == pytest.approx(np.log(dm.y_std))


def test_protein_has_five_splits(uci_root):
    assert uci_info(uci_root, "protein-tertiary-structure") == {
        "n_splits": 5,
        "n_hidden": 100,
        "n_epochs": 20,
    }
    with pytest.raises(ValueError, match=r"`split` must be an integer in \[0, 5\)"):
        load_uci_split(uci_root, "protein-tertiary-structure", 5)


@pytest.mark.parametrize("split", [-1, 20, "0", True])
def test_bad_split(uci_root, split):
    with pytest.raises(ValueError, match="`split`"):
        UCIRegressionDatamodule("yacht", split=split, root=uci_root)


def test_unknown_name_lists_valid_ones(uci_root):
    with pytest.raises(ValueError, match="`name` must be one of bostonHousing, concrete") as err:
        UCIRegressionDatamodule("boston", root=uci_root)
    assert all(name in str(err.value) for name in UCI_DATASETS)


def test_missing_files_name_root(tmp_path, uci_root):
    with pytest.raises(FileNotFoundError, match="`root`"):
        UCIRegressionDatamodule("yacht", root=tmp_path / "nowhere")
    copy = tmp_path / "yacht"
    shutil.copytree(uci_root / "yacht", copy)
    copy.joinpath("index_test_4.txt").chmod(0o644)
    copy.joinpath("index_test_4.txt").unlink()
    with pytest.raises(FileNotFoundError, match="index_test_4.txt"):
        load_uci_split(tmp_path, "yacht", 4)


@pytest.fixture
def yacht_copy(tmp_path, uci_root):
    copy = tmp_path / "yacht"
    shutil.copytree(uci_root / "yacht", copy)
    for path in copy.iterdir():
        path.chmod(0o644)
    copy.chmod(0o755)
    return tmp_path


def test_checksum_verification_catches_a_corrupted_byte(yacht_copy):
    verify_uci(yacht_copy, "yacht")
    path = yacht_copy / "yacht" / "data.txt"
    content = bytearray(path.read_bytes())
    content[100] = ord("7") if content[100] != ord("7") else ord("8")
    path.write_bytes(bytes(content))
    with pytest.raises(ValueError, match=r"SHA-256 mismatch in \['data.txt'\]"):
        verify_uci(yacht_copy, "yacht")
    with pytest.raises(ValueError, match="failed verification"):
        UCIRegressionDatamodule("yacht", root=yacht_copy, download=True)


def test_download_fetches_only_missing_files_and_checks_them(yacht_copy, monkeypatch, uci_root):
    """No network: ``urlopen`` is replaced by a stub serving the shared files."""
    folder = yacht_copy / "yacht"
    folder.joinpath("index_train_7.txt").unlink()
    requested = []

    def fake_urlopen(url, timeout):
        requested.append(url)
        file = url.rsplit("/", 1)[1]
        return io.BytesIO((uci_root / "yacht" / file).read_bytes() + served_suffix)

    monkeypatch.setattr("urllib.request.urlopen", fake_urlopen)
    served_suffix = b"corrupt"
    with pytest.raises(ValueError, match="does not match its SHA-256"):
        download_uci(yacht_copy, "yacht")
    assert not folder.joinpath("index_train_7.txt").exists()
    served_suffix = b""
    download_uci(yacht_copy, "yacht")
    assert len(requested) == 2 and requested[-1].endswith(
        "UCI_Datasets/yacht/data/index_train_7.txt"
    )
    assert "6eb4497628d12b0f300f4b4f6bdc386bebad565c" in requested[-1]
    digest = hashlib.sha256(folder.joinpath("index_train_7.txt").read_bytes()).hexdigest()
    assert (
        digest
        == hashlib.sha256((uci_root / "yacht" / "index_train_7.txt").read_bytes()).hexdigest()
    )


def test_datamodule_trains_a_method_with_lightning(uci_root):
    from lightning import Trainer

    from uq_box.methods import MVERegression
    from uq_box.models import MLP

    dm = UCIRegressionDatamodule("yacht", split=0, root=uci_root, val_fraction=0.2)
    model = MVERegression(MLP(dm.num_features, (50,), 2))
    trainer = Trainer(
        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, datamodule=dm)
    metrics = trainer.test(model, datamodule=dm, verbose=False)[0]
    assert np.isfinite(metrics["test_rmse"])


def test_default_root_is_the_variable_or_the_user_cache(monkeypatch, tmp_path):
    from uq_box.datamodules import uci

    monkeypatch.setenv("UQ_BOX_UCI_ROOT", str(tmp_path / "mine"))
    assert uci.default_uci_root() == tmp_path / "mine"
    monkeypatch.delenv("UQ_BOX_UCI_ROOT")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert uci.default_uci_root() == tmp_path / "cache" / "uq_box" / "uci"


def test_default_root_downloads_missing_files(monkeypatch, tmp_path, uci_root):
    """With no root given, missing files are fetched into the cache (checksummed download)."""
    import shutil

    from uq_box.datamodules import uci

    cache = tmp_path / "cache"
    monkeypatch.setenv("UQ_BOX_UCI_ROOT", str(cache))
    fetched = []

    def fake_download(root, name):  # the network is not reachable here: copy instead
        fetched.append((root, name))
        shutil.copytree(uci_root / name, root / name)

    monkeypatch.setattr(uci, "download_uci", fake_download)
    module = uci.UCIRegressionDatamodule("yacht")
    assert fetched == [(cache, "yacht")] and module.root == cache
    uci.UCIRegressionDatamodule("yacht")  # complete now: no second download
    assert len(fetched) == 1


def test_target_resolution_of_integer_scores(uci_root):
    from uq_box.datamodules import UCIRegressionDatamodule

    wine = UCIRegressionDatamodule("wine-quality-red", 0, uci_root)
    assert wine.target_resolution == pytest.approx(1.0 / wine.y_std)
    assert UCIRegressionDatamodule("bostonHousing", 0, uci_root).target_resolution == 0.0

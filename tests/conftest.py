import os
from pathlib import Path

import matplotlib
import pytest
import torch

matplotlib.use("Agg")
torch.set_num_threads(1)

UCI_ROOT = Path(
    os.environ.get("UQ_BOX_UCI_ROOT", Path(__file__).parents[2] / "shared" / "data" / "uci")
)


@pytest.fixture
def uci_root() -> Path:
    if not UCI_ROOT.is_dir():
        pytest.fail(f"UCI data not found at {UCI_ROOT}; set UQ_BOX_UCI_ROOT")
    return UCI_ROOT

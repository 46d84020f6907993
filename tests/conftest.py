import os
from pathlib import Path

import matplotlib
import pytest
import torch

matplotlib.use("Agg")
torch.set_num_threads(1)

# the tests read the UCI data from ../shared/data/uci through the variable the library reads
os.environ.setdefault("UQ_BOX_UCI_ROOT", str(Path(__file__).parents[2] / "shared" / "data" / "uci"))
UCI_ROOT = Path(os.environ["UQ_BOX_UCI_ROOT"])


@pytest.fixture
def uci_root() -> Path:
    if not UCI_ROOT.is_dir():
        pytest.fail(f"UCI data not found at {UCI_ROOT}; set UQ_BOX_UCI_ROOT")
    return UCI_ROOT

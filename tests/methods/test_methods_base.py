import torch
from torch import nn

from uq_box.losses import NLL
from uq_box.methods import MVERegression
from uq_box.methods.base import RunningMeans
from uq_box.models import MLP


def test_running_means_are_batch_size_weighted():
    running = RunningMeans()
    running.add("train", {"loss": torch.tensor(1.0), "mse": torch.tensor(4.0)}, 10)
    running.add("train", {"loss": torch.tensor(4.0), "mse": torch.tensor(1.0)}, 30)
    running.add("val", {"loss": torch.tensor(7.0)}, 5)
    means = running.pop("train")
    assert set(means) == {"train_loss", "train_rmse"}
    torch.testing.assert_close(means["train_loss"], torch.tensor(3.25))
    torch.testing.assert_close(means["train_rmse"], torch.tensor(1.75).sqrt())
    assert running.pop("train") == {}
    assert running.pop("val", skip={"loss"}) == {}


def test_running_means_of_stacked_runs_and_their_checkpoint_state():
    running = RunningMeans()
    running.add("train", {"loss": torch.tensor([1.0, 2.0])}, 3)
    running.add("train", {"loss": torch.tensor([3.0, 6.0])}, 1)
    restored = RunningMeans()
    restored.load_state(running.state(), "cpu")
    # the state is the weighted sum and the total weight, as checkpoints store it
    total, weight = running.state()["train_loss"]
    torch.testing.assert_close(total, torch.tensor([6.0, 12.0]))
    assert weight == 4
    restored.add("train", {"loss": torch.tensor([0.0, 0.0])}, 4)
    torch.testing.assert_close(restored.pop("train")["train_loss"], torch.tensor([0.75, 1.5]))
    torch.testing.assert_close(running.pop("train")["train_loss"], torch.tensor([1.5, 3.0]))


def test_a_training_step_keeps_no_graph_in_the_running_terms():
    method = MVERegression(MLP(1, [4], 2), criterion=NLL())
    method.training_step({"input": torch.randn(8, 1), "target": torch.randn(8, 1)}, 0)
    assert not any(v.requires_grad for values, _ in method._running._terms.values() for v in values)


def test_lightning_bookkeeping_attribute_is_plain_and_modules_still_register():
    method = MVERegression(MLP(1, [4], 2))
    method._current_fx_name = "training_step"
    assert method._current_fx_name == "training_step"
    method.extra = nn.Linear(1, 1)
    assert "extra" in dict(method.named_children())


def test_inputs_follow_the_network_dtype_after_conversion():
    method = MVERegression(MLP(1, [4], 2))
    assert method._as_network_dtype(torch.ones(2, dtype=torch.float64)).dtype == torch.float32
    method.double()
    assert method._as_network_dtype(torch.ones(2)).dtype == torch.float64

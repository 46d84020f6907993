"""Plain backbones."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from uq_box.checks import number_in, positive_int


class MLP(nn.Module):
    """Multi-layer perceptron: ``Linear -> activation -> Dropout`` per hidden layer, then ``Linear``.

    With ``dropout_p=0`` the dropout slots hold ``nn.Identity`` (same layer indices, no
    dropout call per forward). With ``batch_norm=True`` every hidden layer is
    ``Linear -> BatchNorm1d -> activation -> Dropout`` (e.g. for MC BatchNorm).

    Args:
        n_inputs: input features.
        n_hidden: width of each hidden layer.
        n_outputs: outputs (2 for a mean and a scale with :class:`uq_box.losses.NLL`).
        activation_fn: activation module used after every hidden layer.
        dropout_p: dropout probability after every hidden layer.
        batch_norm: a ``BatchNorm1d`` after every hidden ``Linear``.
    """

    def __init__(
        self,
        n_inputs: int = 1,
        n_hidden: Sequence[int] = (50,),
        n_outputs: int = 1,
        activation_fn: nn.Module | None = None,
        dropout_p: float = 0.0,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        positive_int(n_inputs, "n_inputs")
        positive_int(n_outputs, "n_outputs")
        for width in n_hidden:
            positive_int(width, "n_hidden")
        number_in(dropout_p, "dropout_p", 0.0, 1.0, closed="low")
        activation_fn = nn.ReLU() if activation_fn is None else activation_fn
        layers: list[nn.Module] = []
        width = n_inputs
        for hidden in n_hidden:
            # without dropout an identity keeps the layer indices (and module names) the same
            dropout = nn.Dropout(dropout_p) if dropout_p > 0 else nn.Identity()
            norm = [nn.BatchNorm1d(hidden)] if batch_norm else []
            layers += [nn.Linear(width, hidden), *norm, activation_fn, dropout]
            width = hidden
        layers.append(nn.Linear(width, n_outputs))
        self.model = nn.Sequential(*layers)
        self.n_inputs = n_inputs
        self.n_outputs = n_outputs

    def forward(self, x: Tensor) -> Tensor:
        """``[N, n_inputs] -> [N, n_outputs]``."""
        return self.model(x)

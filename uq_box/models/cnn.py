"""A small LeNet-like convolutional backbone for small images (the 8x8 digits)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from uq_box.checks import number_in, positive_int


class CNN(nn.Module):
    """``[Conv2d(3x3, same) -> ReLU -> Dropout -> MaxPool2d(2)]`` per entry of ``channels``,
    then ``Flatten -> Linear -> ReLU -> Dropout -> Linear`` (optionally BatchNorm before each
    ``ReLU``).

    Everything is one ``nn.Sequential`` (``self.model``) with ``nn.Flatten`` inside it, so the
    network works on any batch size, including the folded ``[S * N, ...]`` batches of
    :func:`uq_box.nn.sample_forward`, and every ``Conv2d``/``Linear`` can be made Bayesian by
    :func:`uq_box.nn.to_bayesian`. The ``nn.Dropout`` modules after the activations are what MC
    dropout switches on at test time (``dropout_p=0`` makes them no-ops). ``batch_norm=True``
    puts a ``BatchNorm2d`` after every ``Conv2d`` and a ``BatchNorm1d`` after the hidden
    ``Linear``, before the activation (e.g. for MC BatchNorm, which needs BatchNorm layers).

    Args:
        in_channels: channels of the input images.
        n_classes: outputs (class logits).
        channels: output channels of each convolutional block; each block halves the image size.
        hidden: width of the hidden fully connected layer.
        dropout_p: dropout probability after every activation.
        image_size: height and width of the (square) input images.
        batch_norm: a BatchNorm layer after every convolution and the hidden ``Linear``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        n_classes: int = 10,
        channels: Sequence[int] = (16, 32),
        hidden: int = 64,
        dropout_p: float = 0.0,
        image_size: int = 8,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        channels = tuple(channels)
        for name, value in (
            ("in_channels", in_channels),
            ("n_classes", n_classes),
            ("hidden", hidden),
            ("image_size", image_size),
        ):
            positive_int(value, name)
        if not channels:
            raise ValueError(f"`channels` must be a non-empty sequence, got {channels!r}")
        for c in channels:
            positive_int(c, "channels")
        if image_size // 2 ** len(channels) < 1:
            raise ValueError(
                f"`image_size`={image_size} is too small for {len(channels)} pooling blocks "
                f"(`channels`={channels}); each block halves the size"
            )
        number_in(dropout_p, "dropout_p", 0.0, 1.0, closed="low")

        layers: list[nn.Module] = []
        width, size = in_channels, image_size
        for out in channels:
            layers += [
                nn.Conv2d(width, out, kernel_size=3, padding=1),
                *([nn.BatchNorm2d(out)] if batch_norm else []),
                nn.ReLU(),
                nn.Dropout(dropout_p),
                nn.MaxPool2d(2),
            ]
            width, size = out, size // 2
        layers += [
            nn.Flatten(),
            nn.Linear(width * size * size, hidden),
            *([nn.BatchNorm1d(hidden)] if batch_norm else []),
            nn.ReLU(),
            nn.Dropout(dropout_p),
            nn.Linear(hidden, n_classes),
        ]
        self.as_images = ImageInput((in_channels, image_size, image_size))
        self.model = nn.Sequential(*layers)
        self.in_channels = in_channels
        self.image_size = image_size
        self.n_classes = n_classes
        self.n_outputs = n_classes

    def forward(self, x: Tensor) -> Tensor:
        """``[N, C, H, W]`` (or flattened ``[N, C * H * W]``) ``-> [N, n_classes]`` logits."""
        return self.model(self.as_images(x))


class ImageInput(nn.Module):
    """Images ``[N, C, H, W]`` as they are, flattened images ``[N, C * H * W]`` reshaped.

    Args:
        shape: ``(C, H, W)``.
    """

    def __init__(self, shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 2:
            return x
        numel = self.shape[0] * self.shape[1] * self.shape[2]
        if x.shape[1] != numel:
            raise ValueError(
                f"flattened input has {x.shape[1]} features; expected {numel} (images "
                f"{list(self.shape)})"
            )
        return x.reshape(x.shape[0], *self.shape)

    def extra_repr(self) -> str:
        return f"shape={self.shape}"

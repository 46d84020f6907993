"""A small U-Net (Ronneberger et al. 2015) for dense prediction on small images."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from uq_box.checks import number_in, positive_int

__all__ = ["UNet"]


class _Block(nn.Sequential):
    """``[Conv2d(3x3, same) -> ReLU] x 2`` with an optional ``nn.Dropout`` after each ReLU."""

    def __init__(self, in_channels: int, out_channels: int, dropout_p: float) -> None:
        layers: list[nn.Module] = []
        for c_in in (in_channels, out_channels):
            layers += [nn.Conv2d(c_in, out_channels, 3, padding=1), nn.ReLU()]
            if dropout_p > 0:
                layers.append(nn.Dropout(dropout_p))
        super().__init__(*layers)


class UNet(nn.Module):
    """Encoder-decoder with skip connections: ``[N, in_channels, H, W]`` ->
    ``[N, out_channels, H, W]``.

    ``depth`` times: a block (two 3x3 convolutions) and a 2x2 max pool, doubling the width; a
    bottleneck block; then ``depth`` times: upsampling (a 2x2 transposed convolution, or bilinear
    upsampling followed by a 1x1 convolution), concatenation with the encoder's features at that
    scale (the skip), and a block; last a 1x1 convolution head. ``H`` and ``W`` must be
    divisible by ``2**depth``.

    The graph is plain ``torch.fx``-traceable code, so every uq_box method runs its ``S`` samples
    as one batched call: MC dropout (``dropout_p > 0`` puts ``nn.Dropout`` after the activations
    of the blocks chosen by ``dropout_at``), Bayes by Backprop on any subset of the convolutions
    (e.g. only the bottleneck: ``stochastic_module_names=["bottleneck.0", "bottleneck.2"]``, or
    only the decoder: the names of :meth:`decoder_layers`), SWAG and SG-MCMC on chosen modules, deep ensembles.

    Args:
        in_channels: channels of the input images.
        out_channels: output channels (class logits, or the criterion's outputs per target).
        depth: number of down- (and up-) sampling steps.
        width: channels of the first block (doubled at every step down).
        dropout_p: dropout probability after the activations of the blocks in ``dropout_at``.
        dropout_at: where the dropout goes: ``"all"`` blocks, ``"bottleneck"``, or the
            ``"decoder"`` (the bottleneck and the decoder blocks).
        upsampling: ``"transpose"`` (2x2 transposed convolutions) or ``"bilinear"``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 2,
        depth: int = 2,
        width: int = 8,
        dropout_p: float = 0.0,
        dropout_at: str = "all",
        upsampling: str = "transpose",
    ) -> None:
        super().__init__()
        positive_int(in_channels, "in_channels")
        positive_int(out_channels, "out_channels")
        positive_int(depth, "depth")
        positive_int(width, "width")
        number_in(dropout_p, "dropout_p", 0.0, 1.0, closed="low")
        if dropout_at not in ("all", "bottleneck", "decoder"):
            raise ValueError(
                f"`dropout_at` must be 'all', 'bottleneck' or 'decoder', got {dropout_at!r}"
            )
        if upsampling not in ("transpose", "bilinear"):
            raise ValueError(f"`upsampling` must be 'transpose' or 'bilinear', got {upsampling!r}")
        self.depth = depth
        widths = [width * 2**i for i in range(depth + 1)]
        p_enc = dropout_p if dropout_at == "all" else 0.0
        p_dec = dropout_p if dropout_at in ("all", "decoder") else 0.0
        self.down = nn.ModuleList()
        c_in = in_channels
        for w in widths[:-1]:
            self.down.append(_Block(c_in, w, p_enc))
            c_in = w
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = _Block(widths[-2], widths[-1], dropout_p)
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for w_high, w in zip(reversed(widths[1:]), reversed(widths[:-1]), strict=True):
            if upsampling == "transpose":
                self.up.append(nn.ConvTranspose2d(w_high, w, 2, stride=2))
            else:
                self.up.append(
                    nn.Sequential(
                        nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                        nn.Conv2d(w_high, w, 1),
                    )
                )
            self.dec.append(_Block(2 * w, w, p_dec))
        self.head = nn.Conv2d(widths[0], out_channels, 1)

    def decoder_layers(self) -> list[str]:
        """Names of the decoder's convolutions (``up``, ``dec`` and ``head``), e.g. for
        ``stochastic_module_names`` (a Bayesian decoder on a deterministic encoder).
        """
        convs = (nn.Conv2d, nn.ConvTranspose2d)
        return [
            name
            for name, module in self.named_modules()
            if name.startswith(("up.", "dec.", "head")) and isinstance(module, convs)
        ]

    def forward(self, x: Tensor) -> Tensor:
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for up, block, skip in zip(self.up, self.dec, reversed(skips), strict=True):
            x = block(torch.cat([up(x), skip], dim=1))
        return self.head(x)

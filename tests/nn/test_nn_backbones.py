"""Vectorized Monte Carlo on any graph: every backbone x placement x estimator equals a loop.

The loop runs ``S`` single forward passes of the same Bayesian network, each given the noise of
one sample (replayed with ``noise_fn``); for the reparameterization estimator the sampled weights
are also plugged into the original deterministic network (``functional_call``), so the reference
shares no code with the vectorized path.
"""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from backbones import BACKBONE_CASES, BACKBONES, with_dropout
from torch import nn
from torch.func import functional_call

from uq_box.nn import mc_plan, sample_forward, to_bayesian, to_mc_dropout
from uq_box.nn.layers import ESTIMATORS, _BayesianLayer

DTYPE = torch.float64
NUM_SAMPLES = 3


class Replay:
    """``noise_fn`` that records the vectorized pass's noise and replays one sample of it.

    Keys are ``(module, name, call index)``: a layer called twice in a forward pass draws its
    weights once (tied) but its per-row noise (signs, local outputs) at every call.
    """

    def __init__(self, num_samples: int, seed: int = 1) -> None:
        self.num_samples = num_samples
        self.gen = torch.Generator().manual_seed(seed)
        self.table: dict = {}
        self.sample: int | None = None
        self.counts: dict = {}

    def start(self, sample: int | None) -> "Replay":
        self.sample, self.counts = sample, {}
        return self

    def __call__(self, module, name, shape):
        estimator = getattr(module, "estimator", None)
        if name in ("weight", "bias") and estimator == "reparameterization":
            assert (module, name) not in self.counts, "weights are drawn once per pass"
        if name == "weight" and estimator == "flipout":
            assert (module, name) not in self.counts, "weights are drawn once per pass"
        index = self.counts.get((module, name), 0)
        self.counts[(module, name)] = index + 1
        key = (module, name, index)
        if self.sample is None:
            self.table[key] = torch.randn(shape, generator=self.gen, dtype=DTYPE)
            return self.table[key]
        full, s = self.table[key], self.sample
        per_row = name.startswith("sign") or (
            name == "bias" and getattr(module, "estimator", None) == "flipout"
        )
        if per_row:  # [S * N, features], sample-major rows
            rows = full.shape[0] // self.num_samples
            return full[s * rows : (s + 1) * rows]
        return full[s : s + 1]


def _bayesian(entry, placement, estimator, seed=0):
    """(deterministic float64 network, its Bayesian copy with random non-trivial rho)."""
    torch.manual_seed(seed)
    base = entry.build(3).to(DTYPE)
    names = entry.placements[placement]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # None: unsupported layers stay deterministic
        bayes = to_bayesian(copy.deepcopy(base), names, estimator=estimator)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in _layers(bayes):
            for p in (layer.weight_rho, layer.bias_rho):
                if p is not None:
                    p.copy_(torch.empty(p.shape, dtype=DTYPE).uniform_(-3.0, -1.0, generator=gen))
    return base, bayes


def _layers(model):
    return [m for m in model.modules() if isinstance(m, _BayesianLayer)]


def _inputs(entry, n=4, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((n, *entry.input_shape), generator=gen, dtype=DTYPE)


def _loop(bayes, x, replay):
    return torch.stack(
        [sample_forward(bayes, x, 1, noise_fn=replay.start(s))[0] for s in range(NUM_SAMPLES)]
    )


def _weights_into_base(base, bayes, x, replay):
    """Reparameterization: sample s's weights plugged into the deterministic network."""
    names = {id(m): n for n, m in bayes.named_modules()}
    outs = []
    for s in range(NUM_SAMPLES):
        # the deterministic layers' parameters and buffers (BatchNorm statistics) as the
        # Bayesian network has them
        kept = {**dict(bayes.named_parameters()), **dict(bayes.named_buffers())}
        params = {n: kept.get(n, p) for n, p in base.state_dict(keep_vars=True).items()}
        for layer in _layers(bayes):
            for kind in ("weight", "bias"):
                mu = getattr(layer, f"{kind}_mu")
                if mu is not None:
                    eps = replay.table[(layer, kind, 0)][s]
                    sigma = F.softplus(getattr(layer, f"{kind}_rho"))
                    params[f"{names[id(layer)]}.{kind}"] = mu + sigma * eps
        outs.append(functional_call(base, params, (x,)))
    return torch.stack(outs)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize(("backbone", "placement"), BACKBONE_CASES)
def test_vectorized_equals_loop_and_gradients(backbone, placement, estimator):
    entry = BACKBONES[backbone]
    base, bayes = _bayesian(entry, placement, estimator)
    x = _inputs(entry)
    for mode in ("train", "eval"):
        bayes.train(mode == "train")
        base.train(mode == "train")
        replay = Replay(NUM_SAMPLES)
        out = sample_forward(bayes, x, NUM_SAMPLES, noise_fn=replay.start(None))
        ref = _loop(bayes, x, replay)
        assert out.shape == (NUM_SAMPLES, *base(x).shape)
        torch.testing.assert_close(out, ref, rtol=1e-7, atol=1e-5)
        assert (out[0] - out[1]).abs().max() > 1e-6  # the samples differ
        if estimator == "reparameterization":
            torch.testing.assert_close(
                out, _weights_into_base(base, bayes, x, replay), rtol=1e-7, atol=1e-5
            )
    # one training step: equal gradients
    bayes.train()
    params = [p for p in bayes.parameters() if p.requires_grad]
    replay = Replay(NUM_SAMPLES)
    loss = sample_forward(bayes, x, NUM_SAMPLES, noise_fn=replay.start(None)).square().mean()
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    ref_grads = torch.autograd.grad(
        _loop(bayes, x, replay).square().mean(), params, allow_unused=True
    )
    for (name, _), g, r in zip(bayes.named_parameters(), grads, ref_grads, strict=True):
        if r is None:
            assert g is None or g.abs().max() == 0, name
            continue
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-7, msg=name)


def _rows_seen(bayes, x):
    """Batch rows each leaf module (Bayesian layers included) gets in a vectorized pass."""
    rows: dict[str, list[int]] = {}
    for name, module in bayes.named_modules():
        if isinstance(module, _BayesianLayer) or not list(module.children()):
            module.register_forward_hook(
                lambda m, a, o, name=name: rows.setdefault(name, []).append(a[0].shape[0])
            )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a traceable backbone: no fallback
        sample_forward(bayes, x, NUM_SAMPLES)  # the first call also builds and checks the plan
    return rows


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_deterministic_layers_run_once(backbone):
    """Layers that depend on no Bayesian layer see the N rows once; those after it S * N."""
    entry = BACKBONES[backbone]
    x = _inputs(entry, n=5)
    _, bayes = _bayesian(entry, "last", "reparameterization")
    rows = _rows_seen(bayes, x)
    assert rows and all(seen == [5] * len(seen) for seen in rows.values()), rows
    _, bayes = _bayesian(entry, "first", "reparameterization")
    rows = _rows_seen(bayes, x)
    first = entry.placements["first"]
    first = first[0] if isinstance(first, list) else first
    assert set(rows[first]) == {5}, rows  # the first Bayesian layer gets the plain batch
    later = [seen for name, seen in rows.items() if name != first and "prior" not in name]
    assert later and all(set(seen) == {5 * NUM_SAMPLES} for seen in later), rows


def test_untraceable_forward_falls_back_with_one_warning():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Linear(3, 4), nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x):
            h = self.a(x) if x.sum() > 0 else self.b(x)  # data-dependent control flow
            return self.head(torch.relu(h) + x.mean(1, keepdim=True))

    torch.manual_seed(0)
    base = Branchy().to(DTYPE)
    bayes = to_bayesian(copy.deepcopy(base), ["a", "b"])
    x = torch.rand(4, 3, dtype=DTYPE) + 0.1
    with pytest.warns(UserWarning, match="folded at the input"):
        sample_forward(bayes, x, NUM_SAMPLES)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        replay = Replay(NUM_SAMPLES)
        out = sample_forward(bayes, x, NUM_SAMPLES, noise_fn=replay.start(None))
    torch.testing.assert_close(out, _loop(bayes, x, replay), rtol=1e-7, atol=1e-5)
    assert mc_plan(bayes, x).graph_module is None


def test_batch_size_used_after_the_first_bayesian_layer_falls_back():
    """``x.size(0)`` taken on the plain batch and used on the folded one: fold at the input."""

    class ViewBySize(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.head = nn.Conv2d(1, 2, 3), nn.Linear(2 * 4 * 4, 2)

        def forward(self, x):
            batch = x.size(0)
            return self.head(self.conv(x).reshape(batch, -1))

    torch.manual_seed(0)
    bayes = to_bayesian(ViewBySize().to(DTYPE), ["conv"])
    x = torch.randn(4, 1, 6, 6, dtype=DTYPE)
    with pytest.warns(UserWarning, match="x.size"):
        sample_forward(bayes, x, NUM_SAMPLES)
    replay = Replay(NUM_SAMPLES)
    out = sample_forward(bayes, x, NUM_SAMPLES, noise_fn=replay.start(None))
    torch.testing.assert_close(out, _loop(bayes, x, replay), rtol=1e-7, atol=1e-5)


def test_batch_first_false_is_refused():
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)  # batch_first=False
    model = nn.Sequential(layer, nn.Linear(8, 2))
    to_bayesian(model, ["0.linear1"])
    with pytest.raises(ValueError, match="batch_first=True"):
        sample_forward(model, torch.randn(5, 4, 8), 3)


def test_attention_projections_and_recurrent_layers_are_refused():
    enc = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    with pytest.raises(ValueError, match="self_attn.out_proj.*MultiheadAttention"):
        to_bayesian(enc, ["self_attn.out_proj"])
    with pytest.raises(ValueError, match="'self_attn'.*F.multi_head_attention_forward"):
        to_bayesian(enc, ["self_attn"])
    for rnn in (nn.LSTM(3, 4, batch_first=True), nn.GRU(3, 4, batch_first=True)):
        model = nn.ModuleDict({"rnn": rnn, "head": nn.Linear(4, 2)})
        with pytest.raises(ValueError, match="recurrent layers"):
            to_bayesian(model, ["rnn"])


def test_transformer_eval_without_grad_samples_the_weights():
    """The fused fast path of nn.TransformerEncoderLayer would read the weights' means."""
    torch.manual_seed(0)
    enc = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True, dropout=0.0).eval()
    model = to_bayesian(nn.Sequential(enc), ["0.linear1"], posterior_rho_init=-1.0)
    x = torch.randn(3, 5, 8)
    with torch.no_grad():
        out = sample_forward(model, x, 4)
        assert (out[0] - out[1]).abs().max() > 1e-3
        assert (model(x) - model(x)).abs().max() > 1e-3


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_conv_transpose_becomes_bayesian(dims, estimator):
    torch.manual_seed(0)
    conv = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[dims - 1]
    base = nn.Sequential(conv(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2)).to(DTYPE)
    x = torch.randn(3, 4, *([4] * dims), dtype=DTYPE)
    bayes = to_bayesian(copy.deepcopy(base), None, estimator=estimator, posterior_rho_init=-40.0)
    with torch.no_grad():  # zero variance: the means reproduce the deterministic layer
        torch.testing.assert_close(bayes(x), base(x), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(sample_forward(bayes, x, 2)[1], base(x), rtol=1e-6, atol=1e-6)
    _, bayes = _bayesian(_Entry(lambda n: base, x.shape[1:]), "all", estimator)
    replay = Replay(NUM_SAMPLES)
    out = sample_forward(bayes, x, NUM_SAMPLES, noise_fn=replay.start(None))
    assert out.shape == (NUM_SAMPLES, *base(x).shape)
    torch.testing.assert_close(out, _loop(bayes, x, replay), rtol=1e-7, atol=1e-5)


class _Entry:
    def __init__(self, build, input_shape):
        self.build, self.input_shape = build, tuple(input_shape)
        self.placements = {"all": None}


@pytest.mark.parametrize(("backbone", "placement"), BACKBONE_CASES)
def test_mc_dropout_vectorized_equals_loop(backbone, placement):
    entry = BACKBONES[backbone]
    names = entry.placements[placement] or [
        n for n, m in entry.build(3).named_modules() if type(m) in (nn.Linear, nn.Conv2d)
    ]
    torch.manual_seed(0)
    model = entry.build(3).to(DTYPE)
    for name in names:
        if name.startswith("enc."):  # the transformer block's own dropout layers
            for module in model.enc.modules():
                if isinstance(module, nn.Dropout):
                    module.p = 0.3
            to_mc_dropout(model)
        else:
            with_dropout(model, name)
    x = _inputs(entry)
    for mode in ("train", "eval"):
        model.train(mode == "train")
        replay = Replay(NUM_SAMPLES)
        out = sample_forward(model, x, NUM_SAMPLES, noise_fn=replay.start(None))
        torch.testing.assert_close(out, _loop(model, x, replay), rtol=1e-7, atol=1e-5)
        assert (out[0] - out[1]).abs().max() > 1e-6
    assert {name for _, name, _ in replay.table} == {"mask"}


@pytest.mark.laplace  # torchvision is installed in the Laplace environment only
@pytest.mark.parametrize(
    ("backbone", "placement"),
    [
        ("resnet18", "last"),
        ("resnet18", "inner"),
        ("resnet18", "block+last"),
        ("resnet18", "all"),
        ("densenet121", "inner+last"),
        ("mobilenet_v3_small", "last"),
        ("mobilenet_v3_small", "inner"),
        ("vit", "last"),
        ("vit", "mlp"),
    ],
)
def test_torchvision_backbones(backbone, placement):
    from backbones import torchvision_backbones

    entry = torchvision_backbones()[backbone]
    _, bayes = _bayesian(entry, placement, "reparameterization")
    with torch.no_grad():
        for module in bayes.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0  # train mode: no mask the noise replay does not cover
            for p in module.parameters(recurse=False):
                if not p.any():  # e.g. ViT's zero-initialized head
                    p.normal_(0.0, 0.1)
    x = _inputs(entry, n=2)
    for mode in ("train", "eval"):
        bayes.train(mode == "train")
        replay = Replay(2)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # traced, no fallback
            out = sample_forward(bayes, x, 2, noise_fn=replay.start(None))
        ref = torch.stack(
            [sample_forward(bayes, x, 1, noise_fn=replay.start(s))[0] for s in (0, 1)]
        )
        torch.testing.assert_close(out, ref, rtol=1e-7, atol=1e-5)
        assert (out[0] - out[1]).abs().max() > 1e-6

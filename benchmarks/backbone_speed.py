"""Monte Carlo prediction on a torchvision resnet18: ``sample_forward`` vs a loop over samples.

resnet18 (torchvision, no weights, ``num_classes=10``), eval mode, ``torch.no_grad``, one thread,
``3 x 64 x 64`` inputs, ``S = 16`` samples, batch 1, 8 and 64. Two choices of Bayesian layers:

- ``(a) fc``: only the head ``fc``;
- ``(b) layer4+fc``: every ``Conv2d``/``Linear`` under ``layer4`` (names taken from
  ``model.named_modules()``) plus ``fc``;

each with the library's default estimator (``"reparameterization"``) and with ``"local"``.
Three calls are timed, interleaved within each repeat (median over ``--repeats``):

- ``deterministic``: one forward of the plain resnet18 (same weights, nothing Bayesian);
- ``vectorized``: ``uq_box.nn.sample_forward(model, x, S)``, the S samples as one batched pass;
- ``loop``: ``torch.stack([model(x) for _ in range(S)])``, S single passes of the same model.

Every call is warmed up first (the first ``sample_forward`` per network and mode traces it and
checks the plan). A call shorter than ~0.1 s is repeated within a repeat and averaged. The
ratios are medians over the repeats of the ratios within a repeat: the three calls of a repeat
run back to back, so a change of load on the machine cancels out.

Peak memory (Linux): each (configuration, batch, method) runs in a fresh subprocess, which builds
the models and makes one warm-up call of the method (kernels loaded, ``sample_forward``'s plan
built and checked). Then it hands the free heap back to the OS (glibc ``malloc_trim(0)``), resets
the process's high-water resident set (``echo 5 > /proc/self/clear_refs``: building the model
peaks higher than a forward, so without the reset the mark would not move), takes the resident
set ``VmRSS`` as the baseline, makes two measured calls and reports the rise of the high-water
mark ``VmHWM`` (``/proc/self/status``) over the baseline: the peak working set of the call --
activations, sampled weights, noise and temporaries -- on top of the parameters and the input, at
page granularity (plus what the allocator keeps). Not ``getrusage().ru_maxrss``: in a child
process it is at least the parent's resident set at the fork (the kernel carries it over the
``exec``). Not ``tracemalloc``: PyTorch's CPU allocator calls ``posix_memalign`` directly, so
tensor memory is invisible to it.

Sanity checks (raise on failure): vectorized and loop outputs have the same shape ``[S, N, 10]``,
are finite, and the S vectorized samples differ from each other (as do the loop's).

Run (needs torchvision: the Laplace environment)::

    .venv-laplace/bin/python benchmarks/backbone_speed.py [--repeats 5] [--batch-sizes 1 8 64]
        [--num-samples 16] [--image-size 64] [--estimators reparameterization local] [--quick]

Targets (project issue): vectorized never slower than the loop at any batch size; (a) costs at
most 1.3x one deterministic forward.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import ctypes.util
import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torchvision
from torch import Tensor, nn

from uq_box.nn import sample_forward, to_bayesian

NUM_CLASSES = 10
CONFIGS = ("a", "b")
CONFIG_LABELS = {"a": "(a) fc", "b": "(b) layer4+fc"}
MIN_REPEAT_SECONDS = 0.1


def plain_resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=NUM_CLASSES).eval()


def bayesian_names(model: nn.Module, config: str) -> list[str]:
    if config == "a":
        return ["fc"]
    layer4 = [
        name
        for name, module in model.named_modules()
        if name.startswith("layer4.") and isinstance(module, nn.Conv2d | nn.Linear)
    ]
    return [*layer4, "fc"]


def build(config: str, estimator: str) -> tuple[nn.Module, nn.Module]:
    """The plain resnet18 and a Bayesian copy of it (same weights as posterior means)."""
    plain = plain_resnet18()
    names = bayesian_names(plain, config)
    bayes = to_bayesian(copy.deepcopy(plain), names, estimator=estimator).eval()
    return plain, bayes


def methods(
    plain: nn.Module, bayes: nn.Module, x: Tensor, num_samples: int
) -> dict[str, Callable[[], Tensor]]:
    return {
        "deterministic": lambda: plain(x),
        "vectorized": lambda: sample_forward(bayes, x, num_samples),
        "loop": lambda: torch.stack([bayes(x) for _ in range(num_samples)]),
    }


def check(vectorized: Tensor, loop: Tensor, num_samples: int, batch: int) -> None:
    expected = (num_samples, batch, NUM_CLASSES)
    for name, out in (("vectorized", vectorized), ("loop", loop)):
        if tuple(out.shape) != expected:
            raise RuntimeError(f"{name} output has shape {tuple(out.shape)}, expected {expected}")
        if not torch.isfinite(out).all():
            raise RuntimeError(f"{name} output is not finite")
        if num_samples > 1:
            spread = (out[1:] - out[0]).abs().flatten(1).amax(1)
            if not (spread > 0).all():
                raise RuntimeError(f"{name}: some Monte Carlo samples equal the first one")


def time_row(config: str, estimator: str, batch: int, args: argparse.Namespace) -> dict[str, float]:
    """Median milliseconds of the three calls for one configuration and batch size, and the
    medians of the per-repeat ratios ``vec_det`` and ``loop_vec``.
    """
    plain, bayes = build(config, estimator)
    torch.manual_seed(1)
    x = torch.randn(batch, 3, args.image_size, args.image_size)
    calls = methods(plain, bayes, x, args.num_samples)
    numbers = {}
    with torch.no_grad():
        outputs = {}
        for name, call in calls.items():
            outputs[name] = call()  # warm-up (sample_forward: trace and check the plan)
            start = time.perf_counter()
            call()
            numbers[name] = max(1, math.ceil(MIN_REPEAT_SECONDS / (time.perf_counter() - start)))
        check(outputs["vectorized"], outputs["loop"], args.num_samples, batch)
        times: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(args.repeats):
            for name, call in calls.items():
                start = time.perf_counter()
                for _ in range(numbers[name]):
                    call()
                times[name].append((time.perf_counter() - start) / numbers[name])
    row = {name: 1e3 * statistics.median(values) for name, values in times.items()}
    vectorized, deterministic, loop = times["vectorized"], times["deterministic"], times["loop"]
    row["vec_det"] = statistics.median(
        v / d for v, d in zip(vectorized, deterministic, strict=True)
    )
    row["loop_vec"] = statistics.median(lo / v for lo, v in zip(loop, vectorized, strict=True))
    return row


def status_kib(field: str) -> int:
    """``VmRSS`` (resident set) or ``VmHWM`` (its high-water mark) of this process, in KiB."""
    with open("/proc/self/status") as file:
        return next(int(line.split()[1]) for line in file if line.startswith(f"{field}:"))


def memory_worker(
    config: str, estimator: str, batch: int, method: str, args: argparse.Namespace
) -> None:
    """Print the rise of the peak RSS (MiB) of ``method`` over the baseline (subprocess)."""
    torch.set_num_threads(1)
    plain, bayes = build(config, estimator)
    torch.manual_seed(1)
    x = torch.randn(batch, 3, args.image_size, args.image_size)
    call = methods(plain, bayes, x, args.num_samples)[method]
    with torch.no_grad():
        call()  # warm-up (sample_forward: trace and check the plan), outside the measurement
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as file:  # reset the high-water mark
            file.write("5")
        baseline = status_kib("VmRSS")
        for _ in range(2):
            call()
        peak = status_kib("VmHWM")
    print(json.dumps({"peak_mib": (peak - baseline) / 1024}))


def peak_memory(
    config: str, estimator: str, batch: int, method: str, args: argparse.Namespace
) -> float:
    command = [
        sys.executable,
        __file__,
        "--memory-worker",
        config,
        estimator,
        str(batch),
        method,
        "--num-samples",
        str(args.num_samples),
        "--image-size",
        str(args.image_size),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(f"memory worker {command[3:7]} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_mib"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument(
        "--estimators",
        nargs="+",
        default=["reparameterization", "local"],
        choices=["reparameterization", "local", "flipout"],
    )
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 1 repeat, batch 1 and 8, S=4"
    )
    parser.add_argument("--memory-worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_worker:
        config, estimator, batch, method = args.memory_worker
        memory_worker(config, estimator, int(batch), method, args)
        return
    if args.quick:
        args.repeats, args.batch_sizes, args.num_samples = 1, [1, 8], 4
    torch.set_num_threads(1)
    header = (
        "| config | batch | deterministic forward (ms) | vectorized (ms) | loop (ms) | "
        "vectorized/deterministic | loop/vectorized | peak memory vectorized / loop (MiB) |"
    )
    rows, deterministic_memory, verdicts = [], {}, []
    for config in args.configs:
        for estimator in args.estimators:
            label = f"{CONFIG_LABELS[config]}, {estimator}"
            for batch in args.batch_sizes:
                ms = time_row(config, estimator, batch, args)
                mem = {
                    m: peak_memory(config, estimator, batch, m, args)
                    for m in ("vectorized", "loop")
                }
                if batch not in deterministic_memory:
                    deterministic_memory[batch] = peak_memory(
                        config, estimator, batch, "deterministic", args
                    )
                vec_det, loop_vec = ms["vec_det"], ms["loop_vec"]
                rows.append(
                    f"| {label} | {batch} | {ms['deterministic']:.1f} | {ms['vectorized']:.1f} | "
                    f"{ms['loop']:.1f} | {vec_det:.2f}x | {loop_vec:.2f}x | "
                    f"{mem['vectorized']:.1f} / {mem['loop']:.1f} |"
                )
                print(rows[-1], file=sys.stderr, flush=True)  # progress
                if loop_vec < 1:
                    verdicts.append(f"MISSED: {label}, batch {batch}: vectorized slower than loop")
                if config == "a" and vec_det > 1.3:
                    verdicts.append(f"MISSED: {label}, batch {batch}: {vec_det:.2f}x > 1.3x")
    print(
        f"resnet18 (num_classes={NUM_CLASSES}), S={args.num_samples}, "
        f"{args.image_size}x{args.image_size} inputs, eval, no_grad, 1 thread, "
        f"median of {args.repeats} repeats; torch {torch.__version__}, "
        f"torchvision {torchvision.__version__}\n"
    )
    print(header)
    print("|" + "---|" * 8)
    print("\n".join(rows))
    print(
        "\nPeak memory: rise of the high-water resident set (VmHWM) over the baseline, "
        "in a fresh process per cell. "
        "Deterministic forward: "
        + ", ".join(f"batch {b}: {m:.1f} MiB" for b, m in deterministic_memory.items())
    )
    print(
        "Targets: vectorized never slower than the loop; (a) at most 1.3x one deterministic "
        "forward: " + ("all met" if not verdicts else "; ".join(verdicts))
    )


if __name__ == "__main__":
    main()

"""Peak memory and time of dense prediction with and without sample chunking.

``S = 32`` MC dropout samples of a U-Net on 8 images of 128x128 pixels (segmentation, 4
classes; pixel regression, 1 target), predicted all at once (``sample_chunk_size = None``) and
in chunks of ``k`` samples. Each configuration runs in a fresh subprocess (torch at one thread,
CPU) and reports the increase of the process's peak resident memory over its memory just before
the prediction (model built, inputs made, one small warm-up prediction done), and the wall time
of the prediction. That the chunked reduction equals the unchunked one is a test
(``tests/methods/test_methods_dense.py``), not measured here.

Run::

    .venv/bin/python benchmarks/dense_memory.py            # the table of docs/benchmarks/dense_memory.md
    .venv/bin/python benchmarks/dense_memory.py --quick    # S=8, 4 images of 64x64
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

CHUNKS = (None, 8, 2)


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def run_one(task: str, chunk: int | None, samples: int, images: int, size: int) -> dict:
    import torch

    torch.set_num_threads(1)
    from uq_box.methods.dense import MCDropoutPixelRegression, MCDropoutSegmentation
    from uq_box.models import UNet

    torch.manual_seed(0)
    if task == "segmentation":
        method = MCDropoutSegmentation(
            UNet(1, 4, depth=2, width=8, dropout_p=0.1), num_mc_samples_test=samples
        )
    else:
        method = MCDropoutPixelRegression(
            UNet(1, 2, depth=2, width=8, dropout_p=0.1), num_mc_samples_test=samples
        )
    method.sample_chunk_size = chunk
    x = torch.randn(images, 1, size, size)
    method.predict_step(x[:1, :, :16, :16])  # warm-up: the Monte Carlo plan is built and cached
    before = _rss_mib()
    start = time.perf_counter()
    preds = method.predict_step(x)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    held = sum(v.numel() * v.element_size() for v in preds.values()) / 2**20
    return {
        "task": task,
        "chunk": chunk,
        "peak_increase_mib": peak - before,
        "seconds": seconds,
        "prediction_mib": held,
        "keys": sorted(preds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="S=8, 4 images of 64x64")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    samples, images, size = (8, 4, 64) if args.quick else (32, 8, 128)
    if args.child:
        task, chunk = args.child
        result = run_one(task, None if chunk == "none" else int(chunk), samples, images, size)
        print(json.dumps(result))
        return
    rows = []
    for task in ("segmentation", "pixel_regression"):
        for chunk in CHUNKS:
            command = [sys.executable, __file__, "--child", task, str(chunk).lower()]
            if args.quick:
                command.insert(2, "--quick")
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"S={samples}, {images} images of {size}x{size}, U-Net depth 2 width 8, CPU, 1 thread")
    print("| task | sample_chunk_size | peak memory increase (MiB) | time (s) | keys |")
    print("| --- | ---: | ---: | ---: | --- |")
    for row in rows:
        chunk = "none (all at once)" if row["chunk"] is None else row["chunk"]
        print(
            f"| {row['task']} | {chunk} | {row['peak_increase_mib']:.0f} | "
            f"{row['seconds']:.2f} | {', '.join(row['keys'])} |"
        )


if __name__ == "__main__":
    main()

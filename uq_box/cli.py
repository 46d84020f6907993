"""The ``uq-box`` command: LightningCLI over the UQ methods and data modules.

``uq-box fit --config configs/toy_heteroscedastic/bnn_vi.yaml`` trains, then tests on the data
module's test split and writes the run's report (test metrics JSON and plots) next to its CSV log.

``--trainer.fast_dev_run=true`` is a smoke test of any config: one batch of training, validation
and testing, then the report is built in a temporary folder and discarded (Lightning writes no
log or checkpoint in a ``fast_dev_run``, and ``uq-box`` writes no report); methods that predict
from snapshots or samples take one at the end of such a run.
"""

from __future__ import annotations

import sys
import tempfile

from lightning import LightningDataModule
from lightning.pytorch.cli import LightningCLI

from uq_box.methods.base import UQMethod


class UQBoxCLI(LightningCLI):
    """LightningCLI that writes a report after ``fit``."""

    def after_fit(self) -> None:
        """Test the fitted model and write the report into the run folder."""
        from uq_box.report import write_report

        trainer, model, datamodule = self.trainer, self.model, self.datamodule
        if not trainer.is_global_zero:
            return
        metrics = trainer.test(model, datamodule=datamodule, verbose=False)[0]
        print("test metrics: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        if trainer.fast_dev_run:
            with tempfile.TemporaryDirectory() as run_dir:
                report = write_report(model, datamodule, run_dir, metrics)
                built = sorted(p.name for p in report.glob("*.png"))
            print(f"fast_dev_run: report built ({', '.join(built)}) and discarded")
            return
        run_dir = trainer.log_dir or trainer.default_root_dir
        report = write_report(model, datamodule, run_dir, metrics)
        print(f"report written to {report}")


def main(args: list[str] | None = None) -> None:
    """Entry point of ``uq-box``; ``uq-box benchmark uci|digits ...`` runs a benchmark."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["benchmark"]:
        if argv[1:2] not in (["uci"], ["digits"]):
            raise SystemExit(
                f"error: `uq-box benchmark` takes a benchmark name: uci or digits; got "
                f"{argv[1:2] or 'none'}"
            )
        from importlib import import_module

        benchmark = import_module(f"uq_box.benchmarks.{argv[1]}")
        raise SystemExit(benchmark.main(argv[2:]))
    UQBoxCLI(
        UQMethod,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        auto_configure_optimizers=False,
    )


if __name__ == "__main__":
    main(sys.argv[1:])

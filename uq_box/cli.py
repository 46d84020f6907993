"""The ``uq-box`` command: LightningCLI over the UQ methods and data modules.

``uq-box fit --config configs/toy_heteroscedastic/bnn_vi.yaml`` trains, then tests on the data
module's test split and writes the run's report (test metrics JSON and plots) next to its CSV log.
"""

from __future__ import annotations

import sys

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
        run_dir = trainer.log_dir or trainer.default_root_dir
        report = write_report(model, datamodule, run_dir, metrics)
        print("test metrics: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        print(f"report written to {report}")


def main(args: list[str] | None = None) -> None:
    """Entry point of ``uq-box``; ``uq-box benchmark uci ...`` runs the UCI benchmark."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["benchmark"]:
        if argv[1:2] != ["uci"]:
            raise SystemExit(
                f"error: `uq-box benchmark` takes a benchmark name: uci; got {argv[1:2] or 'none'}"
            )
        from uq_box.benchmarks.uci import main as benchmark_uci

        raise SystemExit(benchmark_uci(argv[2:]))
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

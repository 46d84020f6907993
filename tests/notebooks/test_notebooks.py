"""The tutorials in ``notebooks/`` run top to bottom in their fast mode, asserts included.

Each notebook is a jupytext percent-format script; it is executed as a script (``runpy``, in
this process, so torch and Lightning are imported once) with ``UQ_BOX_FAST=1``, which cuts
epochs and samples, and without ``UQ_BOX_FIGURES``, so no figure is written. The asserts inside
the notebooks (metric thresholds that hold in the fast mode too) are part of the test.

The docs render the same notebooks (``docs/hooks/notebooks.py``) with the figures of a full-mode
run: two cheap checks keep the site in step with the notebooks.
"""

import os
import re
import runpy
import time
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
from conftest import UCI_ROOT

REPO = Path(__file__).parents[2]
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9]*_*.py"))
FIGURES = REPO / "docs" / "tutorials" / "figures"
#: optional extras a notebook needs; without them its run is skipped, saying which
NEEDS = {"06_gap_nuts_and_updating": ["pyro"]}
SHOW = re.compile(r"""\bshow\(\s*[^,()]+,\s*(?P<quote>["'])(?P<name>[\w.-]+)(?P=quote)\s*\)""")


def test_the_tutorials_are_there():
    assert len(NOTEBOOKS) >= 5, [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_fast_mode(path, tmp_path, monkeypatch):
    for module in NEEDS.get(path.stem, []):
        pytest.importorskip(module, reason=f"{path.name} needs {module} (an optional extra)")
    monkeypatch.setenv("UQ_BOX_FAST", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.delenv("UQ_BOX_FIGURES", raising=False)
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)  # restored after the test
    if "UQ_BOX_UCI_ROOT" not in os.environ:
        monkeypatch.setenv("UQ_BOX_UCI_ROOT", str(UCI_ROOT))
    monkeypatch.chdir(tmp_path)  # anything a notebook writes stays in tmp_path
    start = time.perf_counter()
    try:
        runpy.run_path(str(path), run_name="__main__")
    finally:
        plt.close("all")
    print(f"{path.name}: {time.perf_counter() - start:.1f} s")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_docs_have_the_figures_of_the_notebook(path):
    prefix = path.stem.split("_", 1)[0]
    names = [m["name"] for m in SHOW.finditer(path.read_text())]
    assert names, f"{path.name} shows no figure"
    missing = [f"{prefix}_{n}.png" for n in names if not (FIGURES / f"{prefix}_{n}.png").is_file()]
    assert not missing, (
        f"{missing} missing from docs/tutorials/figures: run "
        f"`UQ_BOX_FIGURES=docs/tutorials/figures python notebooks/{path.name}`"
    )


def test_docs_navigation_lists_every_notebook():
    nav = (REPO / "mkdocs.yml").read_text()
    missing = [p.name for p in NOTEBOOKS if f"tutorials/{p.stem}.md" not in nav]
    assert not missing, f"add these tutorials to the nav of mkdocs.yml: {missing}"

"""MkDocs hook: render the jupytext tutorials in ``notebooks/`` as documentation pages.

Each ``notebooks/NN_name.py`` (jupytext percent format) becomes the page
``tutorials/NN_name.md``, generated in memory when the site builds, so the pages never go stale
and nothing is executed: Markdown cells stay Markdown, code cells become Python code blocks, and
after a code cell that calls ``show(fig, "name")`` the hook inserts the figure
``tutorials/figures/NN_name.png`` that a full-mode run of the notebook saved::

    UQ_BOX_FIGURES=docs/tutorials/figures python notebooks/NN_name.py

A figure that a page needs but that is missing is a warning, so ``mkdocs build --strict`` fails
until the figures are regenerated.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from mkdocs.structure.files import File, Files

log = logging.getLogger("mkdocs.hooks.notebooks")

CELL = re.compile(r"^# %%(?P<rest>.*)$")
SHOW = re.compile(r"""\bshow\(\s*[^,()]+,\s*(?P<quote>["'])(?P<name>[\w.-]+)(?P=quote)\s*\)""")
HEADER_FENCE = "# ---"


def _cells(source: str) -> list[tuple[str, list[str]]]:
    """``(kind, lines)`` of the cells of a percent-format script, its YAML header dropped."""
    lines = source.splitlines()
    if lines and lines[0].strip() == HEADER_FENCE:
        end = next((i for i, line in enumerate(lines[1:], 1) if line.strip() == HEADER_FENCE), None)
        lines = lines[end + 1 :] if end is not None else lines
    cells: list[tuple[str, list[str]]] = []
    kind, body = "code", []
    for line in lines:
        match = CELL.match(line)
        if match:
            cells.append((kind, body))
            kind = "markdown" if "[markdown]" in match["rest"] else "code"
            body = []
        else:
            body.append(line)
    cells.append((kind, body))
    return [(k, _strip_blank(b)) for k, b in cells if any(line.strip() for line in b)]


def _strip_blank(lines: list[str]) -> list[str]:
    while lines and not lines[0].strip():
        lines = lines[1:]
    while lines and not lines[-1].strip():
        lines = lines[:-1]
    return lines


def _uncomment(line: str) -> str:
    if line.startswith("# "):
        return line[2:]
    return line[1:] if line.startswith("#") else line


def notebook_markdown(path: Path, figures: Path, figure_url: str) -> tuple[str, list[str]]:
    """The Markdown page of one notebook and the names of the figures it lacks."""
    stem = path.stem
    prefix = stem.split("_", 1)[0]
    parts: list[str] = []
    missing: list[str] = []
    for index, (kind, lines) in enumerate(_cells(path.read_text(encoding="utf-8"))):
        if kind == "markdown":
            parts.append("\n".join(_uncomment(line) for line in lines))
            if index == 0:
                parts.append(
                    f'!!! note "Run it yourself"\n'
                    f"    This page is the notebook `notebooks/{path.name}` (a jupytext "
                    f"percent-format script). Run it with `python notebooks/{path.name}`, or "
                    f"open it as a notebook with jupytext (`jupytext --to ipynb "
                    f"notebooks/{path.name}`). `UQ_BOX_FAST=1` runs it in seconds with fewer "
                    f"epochs; the figures below come from the full run."
                )
            continue
        code = "\n".join(lines)
        parts.append(f"```python\n{code}\n```")
        for match in SHOW.finditer(code):
            name = f"{prefix}_{match['name']}.png"
            if (figures / name).is_file():
                parts.append(f"![{match['name']}]({figure_url}/{name})")
            else:
                missing.append(name)
    return "\n\n".join(parts) + "\n", missing


def on_files(files: Files, config) -> Files:
    """Add one generated page per notebook under ``tutorials/``."""
    root = Path(config.config_file_path).parent
    docs = Path(config.docs_dir)
    figures = docs / "tutorials" / "figures"
    for path in sorted((root / "notebooks").glob("[0-9]*_*.py")):
        content, missing = notebook_markdown(path, figures, "figures")
        for name in missing:
            log.warning(
                "tutorial %s shows figure %s, which is missing from %s: run "
                "`UQ_BOX_FIGURES=docs/tutorials/figures python notebooks/%s`",
                path.name,
                name,
                figures.relative_to(root),
                path.name,
            )
        uri = f"tutorials/{path.stem}.md"
        existing = files.get_file_from_path(uri)
        if existing is not None:
            files.remove(existing)
        files.append(File.generated(config, uri, content=content))
    return files

"""Griffe extension: turn the Sphinx roles of uq_box's docstrings into API links.

The docstrings are Google style with Sphinx cross-reference roles (``:class:`~uq_box.nn.kl```,
``:func:`to_bayesian```, ``:meth:`grid```). mkdocstrings renders Markdown, where those roles would
show as literal text; this extension rewrites each one into an *optional* autorefs link
(``<autoref identifier=... optional>``): a link where the target is documented, plain code
where it is not, never a warning. A name without a dot is looked up next to the object first
(its members, its parent's members), then left for autorefs to find.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|obj|exc):`(?P<target>[^`]+)`")


def _resolve(target: str, obj: griffe.Object) -> str:
    """Best full identifier for ``target`` seen from ``obj``."""
    if "." in target:
        return target
    scopes = [obj, obj.parent] if obj.parent is not None else [obj]
    for scope in scopes:
        try:
            if target in scope.members:
                return f"{scope.path}.{target}"
        except Exception:  # noqa: BLE001 -- aliases that cannot resolve: fall through
            continue
    return target


def _rewrite(text: str, obj: griffe.Object) -> str:
    def replace(match: re.Match) -> str:
        target = match["target"].strip()
        title = target
        if "<" in target and target.endswith(">"):  # :class:`title <target>`
            title, target = (part.strip() for part in target[:-1].split("<", 1))
        short = target.startswith("~")
        target = target.lstrip("~").removesuffix("()")
        if short:
            title = target.rsplit(".", 1)[-1]
        elif title.startswith("~"):
            title = title.lstrip("~")
        identifier = _resolve(target, obj)
        return f'<autoref identifier="{identifier}" optional><code>{title}</code></autoref>'

    return ROLE.sub(replace, text)


class SphinxRoles(griffe.Extension):
    """Rewrite ``:role:`target``` in every docstring into an optional autorefs link."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None and ":" in obj.docstring.value:
            obj.docstring.value = _rewrite(obj.docstring.value, obj)

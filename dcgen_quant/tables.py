"""Printing result tables for the CLI: aligned text for people, JSON records with ``--json``."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from typing import Any, TextIO


def _cell(value: Any, fmt: str | None) -> str:
    if value is None:
        return "-"
    if (
        fmt
        and isinstance(value, (int, float))
        and not (isinstance(value, float) and math.isnan(value))
    ):
        return format(value, fmt)
    return str(value)


def format_table(
    rows: Sequence[dict[str, Any]],
    columns: Sequence[tuple[str, str, str | None]],
    title: str | None = None,
) -> str:
    """Render ``rows`` as an aligned text table.

    Parameters
    ----------
    rows : one dict per row
    columns : (key, header, format spec or None) per column, e.g. ``("err", "rel err", ".2e")``
    title : optional line above the table
    """
    header = [h for _, h, _ in columns]
    body = [[_cell(row.get(k), f) for k, _, f in columns] for row in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)
    ]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    rule = "  ".join("-" * w for w in widths)
    out = [title] if title else []
    out += [line, rule]
    out += [
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in body
    ]
    return "\n".join(out)


def emit(
    rows: Sequence[dict[str, Any]],
    columns: Sequence[tuple[str, str, str | None]],
    as_json: bool,
    title: str | None = None,
    extra: dict[str, Any] | None = None,
    stream: TextIO | None = None,
) -> None:
    """Print a table, or with ``as_json`` one JSON document ``{"rows": [...], **extra}``."""
    stream = stream or sys.stdout
    if as_json:
        json.dump({**(extra or {}), "rows": list(rows)}, stream, indent=2, default=str)
        stream.write("\n")
    else:
        stream.write(format_table(rows, columns, title) + "\n")

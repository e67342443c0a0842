"""The fuzz runners' shared summary: a row of outcome counts per case class, and the exit code."""

from __future__ import annotations

import sys


def summary(results: list) -> list[dict]:
    """Per case class (``r.case.cls``) and over all: cases, a count per outcome, seconds."""
    rows: dict[str, dict] = {}
    total = {"class": "all", "cases": 0, "seconds": 0.0}
    for r in results:
        row = rows.setdefault(r.case.cls, {"class": r.case.cls, "cases": 0, "seconds": 0.0})
        for target in (row, total):
            target["cases"] += 1
            target[r.outcome] = target.get(r.outcome, 0) + 1
            target["seconds"] += r.seconds
    return [*rows.values(), total]


def report(results: list, outcomes: tuple[str, ...], good: tuple[str, ...], title: str,
           as_json: bool, show: bool) -> int:  # fmt: skip
    """Print the summary table (or JSON) and, on stderr, every case whose outcome is not in
    ``good`` (every case with ``show``); 1 if any case is not good, else 0."""
    from dcgen_quant.tables import emit

    rows = summary(results)
    columns = [("class", "class", None), ("cases", "cases", None)]
    columns += [(o, o, None) for o in outcomes if any(o in r for r in rows)]
    columns += [("seconds", "seconds", ".1f")]
    emit(rows, columns, as_json, title=title)
    bad = [r for r in results if r.outcome not in good]
    for r in results if show else bad:
        print(f"{r.outcome}: {r.case.cls}: {r.case.name}: {r.detail}", file=sys.stderr)
    return 1 if bad else 0

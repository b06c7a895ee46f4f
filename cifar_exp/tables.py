"""Tables as text: aligned columns for a terminal, Markdown for the MLflow UI, CSV for a
spreadsheet. Rows are dicts with the same keys in column order; values are written as given
(0.1600 stays 0.1600: numbers are formatted by whoever made the row)."""

from __future__ import annotations

import csv
import io
from typing import Any

from tabulate import tabulate


def _cells(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    keys = list(rows[0])
    return keys, [[str(r.get(k, "")) for k in keys] for r in rows]


def text_table(rows: list[dict[str, Any]]) -> str:
    """Aligned columns for a terminal; a column of numbers is right-aligned."""
    if not rows:
        return ""
    keys, cells = _cells(rows)
    numeric = [all(number(row[i]) is not None or row[i] == "" for row in cells) for i in range(len(keys))]
    align = ["right" if n else "left" for n in numeric]
    text = tabulate(cells, keys, tablefmt="plain", disable_numparse=True, colalign=align)
    return "\n".join(line.rstrip() for line in text.splitlines()) + "\n"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    keys, cells = _cells(rows)
    return tabulate(cells, keys, tablefmt="github", disable_numparse=True) + "\n"


def csv_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def number(value: Any) -> float | None:
    """The value as a number, if it reads as one ('0.1600', 8); None otherwise."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None

"""Listings: rich tables on a terminal, plain columns through a pipe (the format scripts parse)."""

from __future__ import annotations

from collections.abc import Sequence

from rich.table import Table

from cornserve.cli import console


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned columns separated by two spaces, with a header rule."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


STATE_STYLES = {"ready": "green", "ok": "green", "failed": "red", "degraded": "red", "error": "red"}
"""Colours of state cells on a terminal; any other state (deploying, scaling, ...) is yellow."""


def print_table(
    headers: Sequence[str], rows: Sequence[Sequence[object]], empty: str, state_column: int = -1
) -> None:
    """Print `rows` under `headers` (or the `empty` sentence); `state_column` gets coloured by state."""
    if not rows:
        print(empty)
        return
    if not console.fancy():
        print(table(headers, rows))
        return
    grid = Table(*headers, header_style="bold", box=None, pad_edge=False)
    for row in rows:
        cells = [console.escape(str(c)) for c in row]
        if 0 <= state_column < len(cells):
            cells[state_column] = (
                f"[{STATE_STYLES.get(str(row[state_column]), 'yellow')}]{cells[state_column]}[/]"
            )
        grid.add_row(*cells)
    console.stdout().print(grid)

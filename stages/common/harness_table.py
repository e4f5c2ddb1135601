"""metrics/harness.json (stages/evaluate_harness.py) as table rows: one per task and metric, the document count left
out; the results report, the model cards and the stage's own log show the same rows."""

from __future__ import annotations

from typing import Any


def harness_rows(table: dict[str, Any]) -> list[tuple[str, float, float]]:
    """(label, base, fine-tuned) for every task and metric, e.g. ('harness: held_out_answers acc', 0.32, 0.36)."""
    return [
        (f"harness: {task} {name}", row["base"], row["finetuned"])
        for task, metrics in table.items()
        for name, row in metrics.items()
        if isinstance(row, dict)
    ]

"""What a search leaves on its parent run besides the sweep's table (sweep_summary.py): how its
trials ended, the epochs pruning saved, the points of its history plot, and the best trial's
values of the keys it searched."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from cifar_exp.tracking import identity

PRUNED = "PRUNED"  # the summary's status of a run a search's pruner stopped (MLflow: KILLED)


def search_story(
    children: list[Any], rows: list[dict[str, Any]], epochs: dict[str, list[float]]
) -> dict[str, float]:
    """Trials finished, pruned and failed; epochs trained (a trial pruned within an epoch counts
    the fraction it trained, from its `pruned` tag: "after epoch 1.5 of 4"), and what the same
    trials would have trained without pruning (each child's trainer.epochs, rounded up as the
    loop counts them)."""
    statuses = [r["status"] for r in rows]
    planned = sum(math.ceil(float(c.data.params.get("trainer.epochs", 0) or 0)) for c in children)
    trained = 0.0
    for child in children:
        stopped = re.match(r"after epoch ([\d.]+) ", child.data.tags.get(identity.PRUNED_TAG, ""))
        trained += float(stopped.group(1)) if stopped else len(epochs.get(child.info.run_id, []))
    return {
        "trials_finished": statuses.count("FINISHED"),
        "trials_pruned": statuses.count(PRUNED),
        "trials_failed": statuses.count("FAILED"),
        "epochs_trained": trained,
        "epochs_unpruned": planned,
    }


def history(rows: list[dict[str, Any]], metric: str) -> tuple[list[float | None], list[bool]]:
    """The points of search/history.png: each trial's `metric`, in the order the trials started
    (None: it failed, or has no value), and whether the pruner stopped it."""
    order = sorted(rows, key=lambda r: r["started"])
    values = [r[metric] if r["status"] in ("FINISHED", PRUNED) and r[metric] != "" else None for r in order]
    return values, [r["status"] == PRUNED for r in order]


def searched_values(parent: Any, chosen: dict[str, str]) -> dict[str, str]:
    """`chosen`'s value (the best child's values: sweep_summary.child_values) of every key the
    search chose: hydra.sweeper.params and the sweep overrides of the command line (both in
    sweep_params; older parents: also the overrides tag)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = json.loads(parent.data.tags.get("overrides", "[]"))
    searched = list(json.loads(parent.data.tags.get("sweep_params", "{}")))
    searched += [
        o.key_or_group for o in OverridesParser.create().parse_overrides(overrides) if o.is_sweep_override()
    ]
    return {key: chosen[key] for key in dict.fromkeys(searched) if key in chosen}

"""Seeds as replicates: a sweep's runs that differ only by `seed` form one group per config, shown
as n, mean, standard deviation and a 95% confidence interval (Student's t), and the best group is
told apart from the runner-up by Welch's t-test (unequal variances), or said not to be."""

from __future__ import annotations

import math
import statistics
import warnings
from typing import Any

REPLICATE_KEY = "seed"  # runs that differ only in this key are replicates of one config
CONFIDENCE = 0.95
ALPHA = 0.05  # Welch's p below this: the difference is unlikely to be seed noise


def spread(values: list[float]) -> dict[str, float | str]:
    """Replicate values of one metric as a group's columns: mean, sd (sample standard deviation),
    ci_low and ci_high (the CONFIDENCE interval of the mean: t-distribution, n - 1 degrees of
    freedom); '' where there is none (sd and the interval below two values, all of them for none)."""
    if len(values) < 2:
        return {"mean": statistics.fmean(values) if values else "", "sd": "", "ci_low": "", "ci_high": ""}
    from scipy import stats

    mean, sd = statistics.fmean(values), statistics.stdev(values)
    half = stats.t.ppf((1 + CONFIDENCE) / 2, len(values) - 1) * sd / math.sqrt(len(values))
    return {"mean": mean, "sd": sd, "ci_low": mean - half, "ci_high": mean + half}


def welch_p(a: list[float], b: list[float]) -> float | None:
    """Two-sided p of Welch's t-test that `a` and `b` have the same mean; None when it cannot be
    computed (fewer than two values in either, or no spread in both)."""
    if len(a) < 2 or len(b) < 2:
        return None
    if statistics.stdev(a) == 0 and statistics.stdev(b) == 0:
        return None if statistics.fmean(a) == statistics.fmean(b) else 0.0
    from scipy import stats

    with warnings.catch_warnings():  # nearly equal values: scipy warns of precision, p is still right
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def group_rows(
    rows: list[dict[str, Any]], keys: list[str], metric: str, maximize: bool
) -> list[dict[str, Any]]:
    """One row per config (the values of `keys` but REPLICATE_KEY), best first by the mean of
    `metric` over its finished runs: each of `metric` and test/acc as n, mean, sd, ci_low,
    ci_high; p_vs_best (Welch's t-test on `metric` against the best group), distinguishable,
    best, the seeds and run ids, and best_run_id (its run with the best `metric`)."""
    config_keys = [k for k in keys if k != REPLICATE_KEY]
    measured = list(dict.fromkeys([metric, "test/acc"]))
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(str(row[k]) for k in config_keys), []).append(row)
    sign = 1 if maximize else -1
    out = []
    for members in groups.values():
        done = [r for r in members if r["status"] == "FINISHED" and r[metric] != ""]
        group: dict[str, Any] = {k: members[0][k] for k in config_keys}
        group["n"] = len(done)
        for name in measured:
            values = spread([float(r[name]) for r in done if r[name] != ""])
            group.update({f"{name}_{field}": value for field, value in values.items()})
        group.update(
            p_vs_best="",
            distinguishable="",
            best=False,
            seeds=" ".join(sorted((str(r.get(REPLICATE_KEY, "")) for r in done), key=_natural)),
            run_ids=" ".join(r["run_id"] for r in members),
            best_run_id=max(done, key=lambda r: sign * float(r[metric]))["run_id"] if done else "",
            _values=[float(r[metric]) for r in done],
        )
        out.append(group)
    mean = f"{metric}_mean"
    out.sort(key=lambda g: (g["n"] == 0, -sign * g[mean] if g[mean] != "" else 0.0))
    if out and out[0]["n"]:
        out[0]["best"] = True
        for group in out[1:]:
            p = welch_p(out[0]["_values"], group["_values"])
            if p is not None:
                group["p_vs_best"], group["distinguishable"] = p, p < ALPHA
    for group in out:
        del group["_values"]
    return out


def _natural(value: str) -> tuple[bool, int, str]:
    return not value.isdigit(), int(value) if value.isdigit() else 0, value


def verdict(groups: list[dict[str, Any]], keys: list[str], metric: str) -> str:
    """One line: the best config, and whether the runner-up can be told apart from it."""
    config_keys = [k for k in keys if k != REPLICATE_KEY]
    if not groups or not groups[0]["best"]:
        return "no config finished a run"

    def name(group: dict[str, Any]) -> str:
        return " ".join(f"{k.rsplit('.', 1)[-1]}={group[k]}" for k in config_keys) or "the config"

    best = groups[0]
    line = f"best by mean {metric} over seeds: {name(best)} (n={best['n']})"
    if len(groups) < 2 or not groups[1]["n"]:
        return line
    runner_up, p = groups[1], groups[1]["p_vs_best"]
    if p == "":
        return f"{line}; runner-up {name(runner_up)}: not testable (needs 2+ finished seeds in each)"
    said = "distinguishable" if p < ALPHA else f"not distinguishable (p >= {ALPHA:g}: it may be seed noise)"
    return f"{line}; runner-up {name(runner_up)}: Welch's t-test p={p:.3g}, {said}"

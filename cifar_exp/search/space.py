"""The search space from override syntax, as hydra-optuna-sweeper users write it in
hydra.sweeper.params and on the command line: choice(6,16,32) and a,b,c (categorical),
range(1,10) (integers, the stop left out as in Hydra), interval(0.001,0.3) (floats),
tag(log, interval(...)) (log scale), tag(int, interval(1,64)) (integers). A value that is not a
sweep is held fixed."""

from __future__ import annotations

from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep, Transformer
from hydra.errors import HydraException

from cifar_exp.errors import UserError, first_line


def items(params: Any, overrides: list[str]) -> list[str]:
    """What a sweep is made of, as `key=value` items: hydra.sweeper.params, then the command line's
    overrides (a later item for a key wins, as in Hydra)."""
    return [f"{key}={value}" for key, value in (params or {}).items()] + list(overrides)


def last_overrides(items: list[str]) -> list[tuple[str, Override]]:
    """Each key's last item and its parse, in the order of those last items; one line naming an
    item Hydra cannot read."""
    parser = OverridesParser.create()
    last: dict[str, tuple[str, Override]] = {}
    for item in items:
        try:
            (override,) = parser.parse_overrides([item])
        except HydraException as e:
            raise UserError(f"search space: cannot read {item!r}: {first_line(e)}") from None
        last.pop(override.key_or_group, None)
        last[override.key_or_group] = (item, override)
    return list(last.values())


def parse(items: list[str]) -> tuple[dict[str, Any], list[str]]:
    """(space, fixed): Optuna distributions by key, and the overrides that are not sweeps (as
    written, for every trial's command line). A later item for a key replaces an earlier one."""
    space: dict[str, Any] = {}
    fixed: list[str] = []
    for item, override in last_overrides(items):
        if override.is_sweep_override():
            space[override.get_key_element()] = distribution(override, item)
        else:
            fixed.append(item)
    if not space:
        raise UserError(
            "the search space is empty: set hydra.sweeper.params (e.g. optimizer.lr: "
            "tag(log, interval(0.001, 0.3))) or sweep a key on the command line (key=a,b,c)"
        )
    return space, fixed


def distribution(override: Override, item: str) -> Any:
    """The Optuna distribution an override's sweep stands for; one line naming `item` if Optuna
    refuses its bounds (low > high, a log scale from 0)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    value = override.value()
    try:
        if isinstance(value, ChoiceSweep) or (isinstance(value, RangeSweep) and value.shuffle):
            choices = list(override.sweep_iterator(transformer=Transformer.encode))
            if not choices:
                raise ValueError("no choices")
            return CategoricalDistribution(choices)
        if isinstance(value, RangeSweep):
            values = list(override.sweep_iterator())
            if not values:
                raise ValueError(f"range({value.start}, {value.stop}, {value.step}) holds no values")
            if all(isinstance(v, int) for v in values):
                return IntDistribution(values[0], values[-1], step=int(value.step))
            return FloatDistribution(float(values[0]), float(values[-1]), step=float(value.step))
        if isinstance(value, IntervalSweep):
            log = "log" in value.tags
            if "int" in value.tags:
                return IntDistribution(int(value.start), int(value.end), log=log)
            return FloatDistribution(float(value.start), float(value.end), log=log)
    except ValueError as e:
        raise UserError(f"search space: {item!r}: {first_line(e)}") from None
    raise UserError(f"search space: {item!r}: a search takes choice(), range() or interval() sweeps")


def overrides(params: dict[str, Any]) -> list[str]:
    """A trial's values as overrides (key=value), in a form Hydra reads back to the same value."""
    return [f"{key}={_literal(value)}" for key, value in params.items()]


def _literal(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, int | float):
        return repr(value)
    return str(value)  # choices come encoded already (quoted where the grammar needs it)

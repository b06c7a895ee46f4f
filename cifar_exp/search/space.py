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


def parse(items: list[str]) -> tuple[dict[str, Any], list[str]]:
    """(space, fixed): Optuna distributions by key, and the overrides that are not sweeps (as
    written, for every trial's command line). A later item for a key replaces an earlier one."""
    parser = OverridesParser.create()
    space: dict[str, Any] = {}
    fixed: dict[str, str] = {}
    for item in items:
        try:
            (override,) = parser.parse_overrides([item])
        except HydraException as e:
            raise UserError(f"search space: cannot read {item!r}: {first_line(e)}") from None
        key = override.get_key_element()
        space.pop(key, None)
        fixed.pop(key, None)
        if override.is_sweep_override():
            space[key] = distribution(override, item)
        else:
            fixed[key] = item
    if not space:
        raise UserError(
            "the search space is empty: set hydra.sweeper.params (e.g. optimizer.lr: "
            "tag(log, interval(0.001, 0.3))) or sweep a key on the command line (key=a,b,c)"
        )
    return space, list(fixed.values())


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

"""Whether a rerun's JSON result agrees with the committed one, number by number.

A number agrees when it equals the committed one to :data:`TOLERANCE` (relative), or lies inside
the 95% interval the committed result states for it (:func:`stated_interval`):

- a scalar ``key`` with a sibling ``<key>_interval`` pair or ``<key>_low``/``<key>_high``, or, for a
  point estimate (:data:`POINTS`), ``low``/``high`` or ``ci_low``/``ci_high`` in the same record;
- an element ``i`` of a list ``key`` with sibling lists ``<stem>_low``/``<stem>_high`` (``stem`` is
  ``key`` with a unit suffix such as ``_nats`` removed): elements ``i`` of those;
- an end of an interval (a ``…_low``/``…_high``/``low``/``high`` value, or an element of a
  ``[low, high]`` pair on a path naming an interval): the committed interval it bounds. Two
  reruns' intervals then overlap at least up to that end;
- a scalar point ``key`` (or an end of its interval) whose record also states intervals over other
  sources of variation, ``<key>_<source>_low``/``<key>_<source>_high`` for a source in
  :data:`SOURCES` (a causal-fidelity ρ over positions and over directions): the smallest interval
  holding all of them, since a rerun may differ by any of those sources;
- an element of a ``[point, low, high]`` triple under a key of :data:`TRIPLES` (the injection's
  ``benign``: the control's AUROC and its interval): that triple's ``low`` and ``high``, for the point
  and for either end;
- element ``i`` of a list ``key`` in a dict whose holder also has dicts ``low`` and ``high`` giving
  ``key`` lists of the same length (alignment's ``similarity``, ``low`` and ``high``, each
  ``{lens: [per layer]}``): elements ``i`` of those, for the point and for either end;
- a value ``key`` (or element ``i`` of a list ``key``) of a dict named after a point estimate,
  ``<point>`` or ``<point>_<rest>`` (:data:`POINTS`, e.g. ``rho`` or ``rho_per_seed``), whose
  holder has a dict ``interval`` or ``interval_<rest>`` giving ``key`` a ``[low, high]`` pair (or
  a list of them): that pair (or its element ``i``).

Timings and the other keys of :data:`UNCOMPARED` are not compared.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

UNCOMPARED = {"seconds", "wall_seconds", "tokens_per_second", "load_average", "speedup_wall", "speedup_cpu"}
TOLERANCE = 1e-4
POINTS = {"value", "mean", "auroc", "rho", "point", "accuracy"}
UNITS = ("_nats", "_bits")
SOURCES = ("directions",)
"""Sources of variation a point may state an interval over beside its own (``rho_directions_low``)."""
TRIPLES = ("benign",)
"""Keys whose value is a ``[point, low, high]`` list (an injection method's benign-control AUROC)."""
Where = tuple[Any, str, int | None, str]
"""Where a number sits: ``(its container, its key, its index in a list or None, the container's path)``;
for an element of a nested list the container is the enclosing list and the key the nearest dict key
above it."""


def numbers(value: Any, path: str = "", key: str = "") -> Iterator[tuple[str, float, Where]]:
    """Every number in a JSON value: ``(path, number, where it sits)``."""
    if isinstance(value, dict):
        for name, item in value.items():
            if name in UNCOMPARED or name.endswith("_seconds"):
                continue
            if isinstance(item, (int, float)) and not isinstance(item, bool):
                yield f"{path}.{name}", float(item), (value, name, None, path)
            else:
                yield from numbers(item, f"{path}.{name}", name)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            if isinstance(item, (int, float)) and not isinstance(item, bool):
                yield f"{path}[{index}]", float(item), (value, key, index, path)
            else:
                yield from numbers(item, f"{path}[{index}]", key)


def _pair(low: Any, high: Any) -> tuple[float, float] | None:
    numeric = all(isinstance(end, (int, float)) and not isinstance(end, bool) for end in (low, high))
    return (float(low), float(high)) if numeric else None


def _bounds_of(name: str) -> list[tuple[str, str]]:
    """The keys of the interval ``name`` bounds (``rho_low`` → ``rho_low``/``rho_high``), if it is an end."""
    for low, high in (("low", "high"), ("ci_low", "ci_high")):
        if name in (low, high):
            return [(low, high)]
    for end in ("_low", "_high"):
        if name.endswith(end):
            stem = name.removesuffix(end)
            return [(f"{stem}_low", f"{stem}_high")]
    return []


def _scalar_interval(holder: dict, key: str) -> tuple[float, float] | None:
    pair = holder.get(f"{key}_interval")
    if isinstance(pair, list) and len(pair) == 2 and _pair(*pair):
        return _pair(*pair)
    bounds = [(f"{key}_low", f"{key}_high"), *_bounds_of(key)]
    if key in POINTS:
        bounds += [("low", "high"), ("ci_low", "ci_high")]
    for low, high in bounds:
        if _pair(holder.get(low), holder.get(high)):
            return _widest(holder, key, _pair(holder[low], holder[high]))
    return None


def _widest(holder: dict, key: str, stated: tuple[float, float]) -> tuple[float, float]:
    """``stated`` widened, where ``holder`` gives ``key``'s point intervals over any of :data:`SOURCES`, to
    hold them and the point's own (``rho_low`` → ``rho``, ``rho_directions_high`` → ``rho``)."""
    point = key.removesuffix("_low").removesuffix("_high")
    for source in SOURCES:
        point = point.removesuffix(f"_{source}")
    if not any(f"{point}_{source}_low" in holder for source in SOURCES):
        return stated
    stems = [point, *(f"{point}_{source}" for source in SOURCES)]
    pairs = [stated, *(pair for stem in stems if (pair := _pair(holder.get(f"{stem}_low"), holder.get(f"{stem}_high")))
                       and not any(map(math.isnan, pair)))]
    return min(low for low, _ in pairs), max(high for _, high in pairs)


def _element_interval(container: list, parent: dict | None, key: str, index: int, path: str
                      ) -> tuple[float, float] | None:
    if len(container) == 2 and "interval" in path and _pair(*container):
        return _pair(*container)
    if len(container) == 3 and key in TRIPLES and path.endswith(f".{key}"):
        return _pair(container[1], container[2])
    if parent is None:
        return None
    stems = {key, *(key.removesuffix(unit) for unit in UNITS)}
    for low, high in [(f"{stem}_low", f"{stem}_high") for stem in stems] + _bounds_of(key):
        lows, highs = parent.get(low), parent.get(high)
        if isinstance(lows, list) and isinstance(highs, list) and len(lows) == len(highs) == len(container):
            return _pair(lows[index], highs[index])
    return None


def _point_interval(values: dict | None, key: str, index: int | None, owners: dict[int, tuple[dict, str]]
                    ) -> tuple[float, float] | None:
    """The pair a point estimate's sibling ``interval``/``interval_<rest>`` dict gives ``values[key]``
    (element ``index`` of it for a list), where ``values`` is named ``<point>`` or ``<point>_<rest>``."""
    holder, name = owners.get(id(values), (None, ""))
    point, _, rest = name.partition("_")
    if holder is None or point not in POINTS:
        return None
    pairs = holder.get(f"interval_{rest}" if rest else "interval")
    pair = pairs.get(key) if isinstance(pairs, dict) else None
    if index is not None:
        pair = pair[index] if isinstance(pair, list) and len(pair) == len(values[key]) else None
    return _pair(*pair) if isinstance(pair, list) and len(pair) == 2 else None


def _low_high_interval(values: dict | None, key: str, index: int, owners: dict[int, tuple[dict, str]]
                       ) -> tuple[float, float] | None:
    """Element ``index`` of the list ``values[key]`` where the dict holding ``values`` also holds dicts
    ``low`` and ``high`` giving ``key`` lists of the same length (``similarity``/``low``/``high``, each
    ``{lens: [per layer]}``): that element's pair, for the point and for either end."""
    holder = owners.get(id(values), (None, ""))[0]
    lows, highs = (holder.get("low"), holder.get("high")) if holder is not None else (None, None)
    if not (isinstance(lows, dict) and isinstance(highs, dict)):
        return None
    low, high = lows.get(key), highs.get(key)
    if isinstance(low, list) and isinstance(high, list) and len(low) == len(high) == len(values[key]):
        return _pair(low[index], high[index])
    return None


def stated_interval(where: Where, owners: dict[int, tuple[dict, str]]) -> tuple[float, float] | None:
    """The 95% interval the committed result states for the number at ``where`` (see the module
    docstring); ``owners`` maps a list's or dict's ``id`` to the dict that holds it and its key there."""
    container, key, index, path = where
    if index is None:
        return _scalar_interval(container, key) or _point_interval(container, key, None, owners)
    values = owners.get(id(container), (None, ""))[0]
    return (_element_interval(container, values, key, index, path)
            or _point_interval(values, key, index, owners)
            or _low_high_interval(values, key, index, owners))


def _owners(value: Any, into: dict[int, tuple[dict, str]] | None = None) -> dict[int, tuple[dict, str]]:
    """``id(item) → (the dict holding it, its key)`` for every list or dict directly under a dict in ``value``."""
    into = {} if into is None else into
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else []
    for name, item in items:
        if isinstance(item, (list, dict)) and isinstance(value, dict):
            into[id(item)] = (value, name)
        _owners(item, into)
    return into


def judge(committed: Any, fresh: Any) -> Iterator[tuple[str, str]]:
    """Each number of ``fresh`` against ``committed`` as ``(verdict, line)``: ``"same"`` (to
    :data:`TOLERANCE`), ``"interval"`` (inside the interval ``committed`` states for it) or
    ``"problem"`` (neither, new, or missing from ``fresh``; ``line`` says which)."""
    old = {path: (number, where) for path, number, where in numbers(committed)}
    owners = _owners(committed)
    for path, number, _ in numbers(fresh):
        if path not in old:
            yield "problem", f"{path}: new number {number:g}, not in the committed result"
            continue
        reference, where = old.pop(path)
        if math.isclose(number, reference, rel_tol=TOLERANCE, abs_tol=TOLERANCE * 1e-2):
            yield "same", path
            continue
        interval = stated_interval(where, owners)
        if interval and interval[0] <= number <= interval[1]:
            yield "interval", path
            continue
        outside = f", outside [{interval[0]:g}, {interval[1]:g}]" if interval else ""
        yield "problem", f"{path}: {number:g} against {reference:g}{outside}"
    for path in old:
        yield "problem", f"{path}: missing from the new result"


def compare(committed: Any, fresh: Any) -> list[str]:
    """The numbers of ``fresh`` that neither agree with ``committed`` to :data:`TOLERANCE` nor lie in
    the interval ``committed`` states for them; one line each."""
    return [line for verdict, line in judge(committed, fresh) if verdict == "problem"]


__all__ = ["POINTS", "SOURCES", "TOLERANCE", "TRIPLES", "UNCOMPARED", "compare", "judge", "numbers", "stated_interval"]

"""`tune.space` (dotted spec keys -> distributions) to a Ray Tune search space.

Finite axes are expanded up front and filtered with `tune.filter` (the seeds'
`$filter: ${stride} <= ${patch}`), so a filtered combination can never run:
- search: random: the grid axes, searched as one grid of override sets; other
  distributions are sampled by Tune for each grid point;
- search: grid: the grid and choice axes alike (no sampled axes);
- search: optuna: the choice axes the filter names, joined into one categorical
  axis whose values are the allowed combinations (JSON text, which Optuna's
  categorical distribution accepts), so TPE proposes only allowed ones.
"""
from __future__ import annotations

import ast
import itertools
import json
import operator
import re
from typing import Any

from raygen.spec.errors import SpecError
from raygen.spec.schema import TuneSpec

GRID_KEY = "__grid__"
_REF = re.compile(r"\$\{([A-Za-z_][\w\-.]*)\}")


def _sampler(kind: str, args: list):
    from ray import tune
    return {
        "choice": lambda: tune.choice(args),
        "uniform": lambda: tune.uniform(args[0], args[1]),
        "loguniform": lambda: tune.loguniform(args[0], args[1]),
        "randint": lambda: tune.randint(args[0], args[1]),
        "quniform": lambda: tune.quniform(args[0], args[1], args[2] if len(args) > 2 else 1),
    }[kind]()


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
        ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
        ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.USub: operator.neg, ast.Not: operator.not_,
        ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b}


def _eval(node, names: dict[str, Any]):
    """A tiny evaluator: literals, names, arithmetic, comparisons, and/or/not. No calls, no attributes."""
    if isinstance(node, ast.Expression):
        return _eval(node.body, names)
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return names[node.id]
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_eval(e, names) for e in node.elts]
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_eval(node.left, names), _eval(node.right, names))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_eval(node.operand, names))
    if isinstance(node, ast.BoolOp):
        values = [_eval(v, names) for v in node.values]
        return all(values) if isinstance(node.op, ast.And) else any(values)
    if isinstance(node, ast.Compare):
        left = _eval(node.left, names)
        for op, comp in zip(node.ops, node.comparators):
            right = _eval(comp, names)
            if type(op) not in _OPS or not _OPS[type(op)](left, right):
                return False
            left = right
        return True
    raise ValueError(f"unsupported expression element {type(node).__name__}")


def filter_keys(expression: str) -> list[str]:
    return _REF.findall(expression)


def evaluate_filter(expression: str, values: dict[str, Any]) -> bool:
    names = {}

    def sub(m):
        name = f"v{len(names)}"
        names[name] = values[m.group(1)]
        return name
    try:
        return bool(_eval(ast.parse(_REF.sub(sub, expression), mode="eval"), names))
    except (SyntaxError, ValueError, KeyError, TypeError) as err:
        raise SpecError([f"tune.filter: cannot evaluate '{expression}' ({err})"]) from None


def finite_axes(spec: TuneSpec) -> list[str]:
    """The axes expanded (and filtered) up front for this search."""
    if spec.search == "grid":
        return [k for k, v in spec.space.items() if next(iter(v)) in ("grid", "choice")]
    if spec.search == "optuna":
        named = set(filter_keys(spec.filter)) if spec.filter else set()
        return [k for k, v in spec.space.items() if k in named and "choice" in v]
    return [k for k, v in spec.space.items() if "grid" in v]


def grid_points(spec: TuneSpec) -> list[dict[str, Any]]:
    keys = finite_axes(spec)
    axes = {k: next(iter(spec.space[k].values())) for k in keys}
    if spec.filter:
        unknown = [k for k in filter_keys(spec.filter) if k not in axes]
        if unknown:
            kind = {"random": "grid axes ({grid: [...]})", "grid": "grid or choice axes",
                    "optuna": "choice axes ({choice: [...]})"}[spec.search]
            raise SpecError([f"tune.filter: references {', '.join(unknown)}, which are not {kind} of tune.space "
                             f"(with search: {spec.search} a filter selects among those)"])
    points = [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())] if axes else [{}]
    if spec.filter:
        points = [p for p in points if evaluate_filter(spec.filter, p)]
        if not points:
            raise SpecError([f"tune.filter: '{spec.filter}' rejects every grid point"])
    return points


def build_param_space(spec: TuneSpec) -> dict[str, Any]:
    from ray import tune
    if not spec.space:
        raise SpecError(["tune.space: empty; give at least one key, e.g. {train.optimizer.lr: {loguniform: [1e-4, 1e-2]}}"])
    joined = set(finite_axes(spec))
    space: dict[str, Any] = {k: _sampler(*next(iter(v.items()))) for k, v in spec.space.items() if k not in joined}
    points = grid_points(spec)
    if points != [{}]:
        if spec.search == "optuna":
            space[GRID_KEY] = tune.choice([json.dumps(p, sort_keys=True) for p in points])
        else:
            space[GRID_KEY] = tune.grid_search(points)
    return space


def overrides_from_config(config: dict[str, Any]) -> dict[str, Any]:
    """A trial's config back to dotted spec overrides."""
    out = {k: v for k, v in config.items() if k != GRID_KEY}
    point = config.get(GRID_KEY, {})
    out.update(json.loads(point) if isinstance(point, str) else point)
    return out

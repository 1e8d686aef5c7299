"""A multi grader's ``calculate_output``: arithmetic over its graders' scores (``"(name + email) / 2"``,
``"min(exact, 0.5 * fuzzy ^ 2)"``).

OpenAI's formula language: numbers, the graders' names, ``+ - * / ^`` (``^`` is a power, binding tighter
than ``*`` as in mathematics) and the functions ``min max abs floor ceil exp sqrt log``. Written here on
Python's ``ast`` with a whitelist, not run by ``eval`` nor by an expression library: the language is this
small and exact (a library's ``^`` is a bitwise xor, its extra operators and names would be accepted
where OpenAI refuses them), every value is a float (so ``10 ^ 10 ^ 10`` overflows at once rather than
building a huge integer), and the names a formula reads are checked against the graders when the grader is
created, not when the first answer is graded.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from collections.abc import Callable, Mapping
from functools import lru_cache

MAX_FORMULA_CHARS = 1_000
MAX_FORMULA_NODES = 200
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

_BINARY: dict[type, Callable[[float, float], float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
}
_UNARY: dict[type, Callable[[float], float]] = {ast.USub: operator.neg, ast.UAdd: operator.pos}
FUNCTIONS: dict[str, tuple[Callable[..., float], int | None]] = {  # name: (function, arity; None: 1 or more)
    "min": (lambda *values: min(values), None),
    "max": (lambda *values: max(values), None),
    "abs": (abs, 1),
    "floor": (lambda x: float(math.floor(x)), 1),
    "ceil": (lambda x: float(math.ceil(x)), 1),
    "exp": (math.exp, 1),
    "sqrt": (math.sqrt, 1),
    "log": (math.log, 1),
}


class FormulaError(ValueError):
    """A formula that does not parse, or holds something other than numbers, names, operators and calls."""


class FormulaValueError(ArithmeticError):
    """A formula that has no value for these scores (a division by zero, ``log(0)``, an overflow)."""


@lru_cache(maxsize=256)
def parse_formula(text: str) -> ast.Expression:
    """The formula's tree, checked (see the module docstring).

    Raises:
        FormulaError: saying what is wrong with it.
    """
    if len(text) > MAX_FORMULA_CHARS:
        raise FormulaError(f"a formula has up to {MAX_FORMULA_CHARS} characters")
    try:
        tree = ast.parse(text.replace("^", "**").strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise FormulaError(f"the formula {text[:80]!r} does not parse") from None
    found = list(ast.walk(tree))
    if len(found) > MAX_FORMULA_NODES:
        raise FormulaError(f"a formula has up to {MAX_FORMULA_NODES} parts")
    for node in found:
        _check_node(node)
    return tree


def _check_node(node: ast.AST) -> None:
    match node:
        case ast.Expression() | ast.Load() | ast.Name():
            return
        case ast.BinOp(op=op) if type(op) in _BINARY:
            return
        case ast.UnaryOp(op=op) if type(op) in _UNARY:
            return
        case ast.Constant(value=value) if isinstance(value, int | float) and not isinstance(value, bool):
            return
        case ast.Call(func=ast.Name(id=name), args=args, keywords=[]) if name in FUNCTIONS:
            arity = FUNCTIONS[name][1]
            if (arity is None and not args) or (arity is not None and len(args) != arity):
                want = "one or more values" if arity is None else f"{arity} value"
                raise FormulaError(f"`{name}` takes {want}")
            return
        case ast.Call(func=ast.Name(id=name)):
            raise FormulaError(f"`{name}(…)` is not a function a formula may call ({', '.join(FUNCTIONS)})")
        case ast.operator() | ast.unaryop():
            return  # checked with their BinOp / UnaryOp
    raise FormulaError(
        f"a formula holds numbers, graders' names, + - * / ^ and {', '.join(FUNCTIONS)}; "
        f"not `{ast.unparse(node)[:40] if isinstance(node, ast.expr) else type(node).__name__}`"
    )


def formula_names(text: str) -> set[str]:
    """The names a (checked) formula reads, the functions it calls left out."""
    nodes = list(ast.walk(parse_formula(text)))
    called = {n.func for n in nodes if isinstance(n, ast.Call)}
    return {n.id for n in nodes if isinstance(n, ast.Name) and n not in called}


def evaluate_formula(text: str, scores: Mapping[str, float]) -> float:
    """The formula's value with ``scores`` for the names it reads.

    Raises:
        FormulaError: the formula is not one ``parse_formula`` takes.
        FormulaValueError: it has no finite value for these scores.
    """
    try:
        value = _value(parse_formula(text).body, scores)
    except (ArithmeticError, ValueError) as exc:  # ZeroDivisionError, OverflowError, math domain errors
        if isinstance(exc, FormulaError):
            raise
        raise FormulaValueError(f"the formula {text[:80]!r} has no value for these scores ({exc})") from None
    if not math.isfinite(value):
        raise FormulaValueError(f"the formula {text[:80]!r} is not a finite number for these scores")
    return value


def _value(node: ast.expr, scores: Mapping[str, float]) -> float:
    match node:
        case ast.Constant(value=value):
            return float(value)
        case ast.Name(id=name):
            if name not in scores:
                raise FormulaError(f"the formula reads `{name}`, which is not one of the graders")
            return float(scores[name])
        case ast.BinOp(left=left, op=op, right=right):
            result = _BINARY[type(op)](_value(left, scores), _value(right, scores))
            if isinstance(result, complex):  # a negative number to a fractional power
                raise ValueError("a negative number to a fractional power")
            return float(result)
        case ast.UnaryOp(op=op, operand=operand):
            return _UNARY[type(op)](_value(operand, scores))
        case ast.Call(func=ast.Name(id=name), args=args):
            return float(FUNCTIONS[name][0](*(_value(a, scores) for a in args)))
    raise FormulaError(f"`{ast.unparse(node)[:40]}` is not part of a formula")

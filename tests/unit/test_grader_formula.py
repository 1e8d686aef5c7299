"""A multi grader's formula (``grader_formula.py``) and how a multi grader combines its graders' scores."""

from __future__ import annotations

import math

import pytest

from sqft_service.grader_formula import FormulaError, FormulaValueError, evaluate_formula, formula_names, parse_formula
from sqft_service.graders import GradingError, combine, judge_models, sub_graders


@pytest.mark.parametrize(
    ("formula", "value"),
    [
        ("(a + b) / 2", 0.625),
        ("a ^ 2 * 4 + 1", 3.25),  # ^ is a power and binds tighter than *
        ("2 ^ 3 ^ 2", 512.0),  # and to the right, as in mathematics
        ("-b ^ 2", -0.25),
        ("a - -b", 1.25),
        ("min(a, b, 0.3) + max(a) + abs(-2)", 3.05),
        ("floor(2.7) + ceil(0.1) + sqrt(4) + log(1) + exp(0)", 6.0),
        ("0.5*a+0.5*b", 0.625),
        ("3", 3.0),
    ],
)
def test_a_formula_is_arithmetic_over_the_graders_scores(formula, value):
    assert evaluate_formula(formula, {"a": 0.75, "b": 0.5}) == pytest.approx(value)


def test_a_formula_reads_the_names_it_holds_not_its_functions():
    assert formula_names("min(exact, fuzzy) + 2 * exact") == {"exact", "fuzzy"}
    with pytest.raises(FormulaError, match="`c`, which is not one of the graders"):
        evaluate_formula("a + c", {"a": 1.0})


@pytest.mark.parametrize(
    ("formula", "needle"),
    [
        ('__import__("os").system("x")', "not `__import__('os').system('x')`"),
        ('__import__("os")', "`__import__(…)` is not a function a formula may call"),
        ("a.__class__", "not `a.__class__`"),
        ("a if b else 1", "not `a if b else 1`"),
        ("a < b", "not `a < b`"),
        ("a[0]", "not `a[0]`"),
        ("'text'", "not `'text'`"),
        ("True", "not `True`"),
        ("round(a)", "`round(…)` is not a function"),
        ("sqrt(a, b)", "`sqrt` takes 1 value"),
        ("max()", "`max` takes one or more values"),
        ("a +", "does not parse"),
        ("a; b", "does not parse"),
        ("(" * 300 + "1" + ")" * 300, "does not parse"),
        ("a" + " + a" * 400, "up to 1000 characters"),
        ("+".join(["a"] * 150), "up to 200 parts"),
    ],
)
def test_a_formula_holds_numbers_names_operators_and_its_functions_only(formula, needle):
    with pytest.raises(FormulaError) as refused:
        parse_formula(formula)
    assert needle in str(refused.value), refused.value


@pytest.mark.parametrize(
    "formula", ["a / b", "log(b)", "sqrt(-1)", "10 ^ 10 ^ 10", "(-1) ^ 0.5", "exp(1000)", "1e308 * 10"]
)
def test_a_formula_without_a_finite_value_is_a_value_error_not_a_crash(formula):
    with pytest.raises(FormulaValueError, match="for these scores"):
        evaluate_formula(formula, {"a": 1.0, "b": 0.0})


EXACT = {"type": "string_check", "name": "e", "input": "{{ sample.output_text }}", "reference": "x", "operation": "eq"}
JUDGE = {"type": "score_model", "name": "j", "model": "m", "input": [{"role": "user", "content": "hi"}]}


def test_a_multi_grader_combines_its_graders_by_their_keys():
    multi = {"type": "multi", "name": "m", "graders": {"exact": EXACT, "judge": JUDGE}}
    multi["calculate_output"] = "exact / judge"
    assert sub_graders(multi) == {"exact": EXACT, "judge": JUDGE} and sub_graders(EXACT) == {"e": EXACT}
    assert judge_models(multi) == ["m"] and judge_models(EXACT) == []
    assert combine(multi, {"exact": 1.0, "judge": 0.5}) == 2.0
    assert combine(EXACT, {"e": 0.25}) == 0.25
    with pytest.raises(GradingError, match="no value"):  # counted as an answer the grader could not grade
        combine(multi, {"exact": 1.0, "judge": 0.0})
    assert math.isfinite(combine(multi, {"exact": 0.0, "judge": 1e-300}))

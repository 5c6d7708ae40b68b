"""Fit a tensor dimension as a function of config fields, from probes that double some fields.

A dimension is written as a sum of terms, each an integer (or simple fractional) coefficient times a
product of config fields with small integer exponents: ``hidden_size``, ``2*moe_intermediate_size``,
``hidden_size*num_key_value_heads/num_attention_heads``, ``kv_lora_rank+qk_rope_head_dim``.

Two steps, cheapest first:

1. **monomial**: changing field ``f`` by a factor ``r`` multiplies the dimension by ``r**a_f``; the
   exponents and the coefficient follow from the single-field probes (one per field, shared by every
   tensor);
2. **multilinear sum**: a dimension that doubling does not scale (``kv_lora_rank+qk_rope_head_dim``)
   is a polynomial of degree <= 1 in each field of its support; its values at the 2**n corners of
   {base, changed}**n fix every coefficient.

Every fit is then checked against every probe that has the tensor; a dimension no fit explains is
reported, never guessed.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fractions import Fraction

#: The biggest exponent magnitude a monomial may have, and the largest coefficient denominator.
MAX_EXPONENT = 3
MAX_DENOMINATOR = 8
#: The largest support a multilinear fit enumerates corners for (2**n probes).
MAX_SUPPORT = 5


@dataclass(frozen=True)
class Term:
    """``coefficient * prod(field ** exponent)``."""

    coefficient: Fraction
    powers: tuple[tuple[str, int], ...]  # sorted by field

    def value(self, values: Mapping[str, float]) -> Fraction:
        out = Fraction(self.coefficient)
        for field, power in self.powers:
            out *= Fraction(values[field]) ** power
        return out


@dataclass(frozen=True)
class Expr:
    """A sum of terms; ``str()`` gives the text form :func:`moetool.arch.dims.eval_dim` reads."""

    terms: tuple[Term, ...]

    def value(self, values: Mapping[str, float]) -> Fraction:
        return sum((t.value(values) for t in self.terms), Fraction(0))

    @property
    def fields(self) -> set[str]:
        return {f for t in self.terms for f, _ in t.powers}

    def render(self, symbol: Callable[[str], str] = str) -> str:
        if not self.terms:
            return "0"
        parts: list[str] = []
        for term in self.terms:
            num = [symbol(f) for f, p in term.powers for _ in range(p) if p > 0]
            den = [symbol(f) for f, p in term.powers for _ in range(-p) if p < 0]
            coef = term.coefficient
            sign = "-" if coef < 0 else "+"
            coef = abs(coef)
            factors = ([str(coef.numerator)] if coef.numerator != 1 or not num else []) + num
            text = "*".join(factors)
            if coef.denominator != 1:
                den.insert(0, str(coef.denominator))
            if den:
                text += "/" + "/".join(den)
            parts.append(f"{sign}{text}")
        out = "".join(parts)
        return out[1:] if out.startswith("+") else out


def _nice(coef: Fraction) -> bool:
    return coef != 0 and coef.denominator <= MAX_DENOMINATOR and abs(coef.numerator) <= 1 << 20


def fit_monomial(
    base_value: int, base_fields: Mapping[str, float], ratios: Mapping[str, tuple[Fraction, Fraction]]
) -> Expr | None:
    """A monomial from single-field probes.

    Args:
        base_value: the dimension in the base probe.
        base_fields: the base probe's field values.
        ratios: field -> (field value ratio, dimension ratio) of the probe that changed that field.
    """
    powers: list[tuple[str, int]] = []
    for field_name in sorted(ratios):
        field_ratio, ratio = ratios[field_name]
        if ratio <= 0 or field_ratio <= 0 or field_ratio == 1:
            return None
        exponent = math.log(ratio) / math.log(field_ratio)
        rounded = round(exponent)
        if abs(exponent - rounded) > 1e-9 or rounded == 0 or abs(rounded) > MAX_EXPONENT:
            return None
        if field_ratio**rounded != ratio:
            return None
        powers.append((field_name, rounded))
    denom = Fraction(1)
    for field_name, power in powers:
        denom *= Fraction(base_fields[field_name]) ** power
    coef = Fraction(base_value) / denom
    if not _nice(coef):
        return None
    return Expr((Term(coef, tuple(powers)),))


def fit_multilinear(
    support: list[str],
    corner_value: Callable[[frozenset[str]], tuple[Mapping[str, float], int] | None],
    inverse: frozenset[str] = frozenset(),
) -> Expr | None:
    """A multilinear polynomial in ``support`` from its values at the 2**n corners.

    ``corner_value(changed)`` gives the field values and the dimension of the probe that changed the
    fields in ``changed`` (None: that probe could not be built). The polynomial
    p(x) = sum over subsets S of c_S prod_{f in S} x_f is solved exactly from the corner values.
    Fields in ``inverse`` enter as ``1/x`` (``hidden_size*num_key_value_heads/num_attention_heads``).
    """
    if len(support) > MAX_SUPPORT:
        return None
    subsets = [frozenset(c) for r in range(len(support) + 1) for c in itertools.combinations(support, r)]
    rows: list[list[Fraction]] = []
    rhs: list[Fraction] = []
    for corner in subsets:
        got = corner_value(corner)
        if got is None:
            continue
        fields, value = got
        point = {f: (1 / Fraction(fields[f]) if f in inverse else Fraction(fields[f])) for f in support}
        rows.append([_prod(point, s) for s in subsets])
        rhs.append(Fraction(value))
    solution = _solve(rows, rhs, len(subsets))
    if solution is None:
        return None
    terms = []
    for subset, coef in zip(subsets, solution, strict=True):
        if coef == 0:
            continue
        if not _nice(coef):
            return None
        terms.append(Term(coef, tuple((f, -1 if f in inverse else 1) for f in sorted(subset))))
    terms.sort(key=lambda t: (-len(t.powers), t.powers))
    return Expr(tuple(terms))


@dataclass(frozen=True)
class Patches:
    """``(size // patch) ** 2 + extra``: the patch positions of a vision tower's square image (plus a
    class token), e.g. ``(image_size // patch_size) ** 2 + 1``; neither a monomial nor multilinear."""

    size: str
    patch: str
    extra: int

    def value(self, values: Mapping[str, float]) -> Fraction:
        side = int(values[self.size]) // int(values[self.patch])
        return Fraction(side * side + self.extra)

    @property
    def fields(self) -> set[str]:
        return {self.size, self.patch}

    def render(self, symbol: Callable[[str], str] = str) -> str:
        side = f"({symbol(self.size)}//{symbol(self.patch)})"
        return f"{side}*{side}" + (f"+{self.extra}" if self.extra else "")


def fit_patches(support: list[str], points: list[tuple[Mapping[str, float], int]]) -> Patches | None:
    """A :class:`Patches` form through every ``(field values, value)`` point, over two support fields."""
    if len(support) != 2:
        return None
    for size, patch in itertools.permutations(support):
        for extra in (0, 1):
            candidate = Patches(size, patch, extra)
            try:
                if all(candidate.value(f) == v for f, v in points):
                    return candidate
            except (KeyError, ZeroDivisionError, TypeError, ValueError):
                continue
    return None


@dataclass(frozen=True)
class Rounded:
    """``coefficient * monomial * op(field / divisor)``: a strided reduction of one field, such as
    three stride-2 convolutions over ``num_mel_bins`` (``ceil(num_mel_bins/8)``), which a monomial
    (``num_mel_bins/8``) matches only where the field divides evenly."""

    coefficient: int
    powers: tuple[tuple[str, int], ...]
    field: str
    divisor: int
    op: str  # "ceil" or "floor"

    def value(self, values: Mapping[str, float]) -> Fraction:
        rest = Term(Fraction(self.coefficient), self.powers).value(values)
        quotient = Fraction(values[self.field]) / self.divisor
        return rest * (math.ceil(quotient) if self.op == "ceil" else math.floor(quotient))

    @property
    def fields(self) -> set[str]:
        return {self.field} | {f for f, _ in self.powers}

    def render(self, symbol: Callable[[str], str] = str) -> str:
        rest = Expr((Term(Fraction(self.coefficient), self.powers),)).render(symbol) if self.powers else ""
        if not self.powers and self.coefficient != 1:
            rest = str(self.coefficient)
        rounded = f"{self.op}({symbol(self.field)}/{self.divisor})"
        return f"{rest}*{rounded}" if rest else rounded


@dataclass(frozen=True)
class FloatProduct:
    """``int(a * b)`` with ``b`` a float field: a width a config class computes in floating point
    (Step-3.7's vision ``intermediate_size = int(hidden_size * mlp_ratio)``, mlp_ratio 8960/1536)."""

    a: str
    b: str

    def value(self, values: Mapping[str, float]) -> Fraction:
        return Fraction(math.floor(float(Fraction(values[self.a]) * Fraction(values[self.b]))))

    @property
    def fields(self) -> set[str]:
        return {self.a, self.b}

    def render(self, symbol: Callable[[str], str] = str) -> str:
        return f"int({symbol(self.a)}*{symbol(self.b)})"


def fit_float_product(support: list[str], points: list[tuple[Mapping[str, float], int]]) -> FloatProduct | None:
    """A :class:`FloatProduct` through every point, over two support fields, one of them a float."""
    if len(support) != 2:
        return None
    a, b = sorted(support, key=lambda f: isinstance(points[0][0].get(f), float))
    if not isinstance(points[0][0].get(b), float) or isinstance(points[0][0].get(a), float):
        return None
    candidate = FloatProduct(a, b)
    try:
        return candidate if all(candidate.value(f) == v for f, v in points) else None
    except (KeyError, TypeError, ValueError):
        return None


def rounded_candidates(expr: Expr) -> list[Rounded]:
    """The :class:`Rounded` forms of a one-term monomial with a fractional coefficient (``p/q``): each
    field of exponent 1 divided by ``q`` and rounded up or down."""
    if len(expr.terms) != 1:
        return []
    term = expr.terms[0]
    q = term.coefficient.denominator
    if q == 1 or term.coefficient.numerator <= 0 or any(p < 0 for _, p in term.powers):
        return []
    out = []
    for name, power in term.powers:
        if power != 1:
            continue
        rest = tuple((f, p) for f, p in term.powers if f != name)
        for op in ("ceil", "floor"):
            out.append(Rounded(term.coefficient.numerator, rest, name, q, op))
    return out


def _prod(point: Mapping[str, Fraction], subset: frozenset[str]) -> Fraction:
    out = Fraction(1)
    for field in subset:
        out *= point[field]
    return out


def _solve(rows: list[list[Fraction]], rhs: list[Fraction], n: int) -> list[Fraction] | None:
    """Exact least-structure solve: Gaussian elimination; None when under-determined or inconsistent."""
    matrix = [[*row, b] for row, b in zip(rows, rhs, strict=True)]
    pivots: list[int] = []
    r = 0
    for c in range(n):
        pivot = next((i for i in range(r, len(matrix)) if matrix[i][c] != 0), None)
        if pivot is None:
            return None
        matrix[r], matrix[pivot] = matrix[pivot], matrix[r]
        lead = matrix[r][c]
        matrix[r] = [x / lead for x in matrix[r]]
        for i in range(len(matrix)):
            if i != r and matrix[i][c] != 0:
                factor = matrix[i][c]
                matrix[i] = [a - factor * b for a, b in zip(matrix[i], matrix[r], strict=True)]
        pivots.append(c)
        r += 1
    for i in range(r, len(matrix)):
        if matrix[i][n] != 0:
            return None
    return [matrix[i][n] for i in range(n)]


def fit_rounded(
    support: list[str], points: list[tuple[Mapping[str, float], int]], base_fields: Mapping[str, float]
) -> str | None:
    """``floor(c*monomial)`` or ``ceil(c*monomial)`` through every point (a config default such as
    ``head_dim = hidden_size // num_attention_heads`` or ``dt_rank = ceil(hidden_size / 16)``).

    Args:
        support: the fields the value depends on.
        points: (field values, value) pairs; the first is the base.
        base_fields: the base field values (the first point's).
    """
    base_value = points[0][1]
    if not base_value:
        return None
    powers: list[tuple[str, int]] = []
    for name in support:
        changed = next(((f, v) for f, v in points[1:] if f[name] != base_fields[name]), None)
        if changed is None or not changed[1]:
            return None
        ratio = changed[1] / base_value
        field_ratio = changed[0][name] / base_fields[name]
        exponent = round(math.log(ratio) / math.log(field_ratio))
        if exponent == 0 or abs(exponent) > MAX_EXPONENT:
            return None
        powers.append((name, exponent))
    monomial = Term(Fraction(1), tuple(sorted(powers)))
    coef = (Fraction(base_value) / monomial.value(base_fields)).limit_denominator(64)
    for candidate in {coef, Fraction(1, coef.denominator) * round(coef * coef.denominator)}:
        term = Term(candidate, monomial.powers)
        for op, fn in (("floor", math.floor), ("ceil", math.ceil)):
            if all(fn(term.value(f)) == v for f, v in points):
                return f"{op}({Expr((term,)).render()})"
    return None

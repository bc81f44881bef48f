"""A small, safe, Python-like expression language over the columns of a record batch.

Used by ``filter`` (``expr: "value > 500 and key != 'key-1'"``) and ``project``
(``columns: {double: "value * 2"}``). Text is parsed with :mod:`ast` (never evaluated by Python)
and translated node by node; anything outside the grammar below is rejected with a ValueError that
names the expression and the offending part.

Grammar
    * column references: bare identifiers (``value``), or ``col("name with spaces")``;
    * literals: int, float, str, ``True``/``False``, ``None``;
    * arithmetic ``+ - * / % **`` and unary ``-``/``+``. They follow Arrow, not Python, for
      integers: ``/`` of two integers is an integer division truncating toward zero (write
      ``cast(x, "float64") / y`` for a fraction), and overflow wraps around. ``%`` is Python's
      modulo (the result has the sign of the divisor);
    * comparisons ``== != < <= > >=``, chained ones (``0 < x <= 10``), ``x in [1, 2]``,
      ``x not in (..)`` (literal lists only), ``x is None`` / ``x is not None``;
    * logic ``and or not`` and the same as ``& | ~`` (always logical, never bitwise). Logic is
      three-valued (SQL's Kleene logic): ``null and False`` is False, ``null and True`` is null;
    * calls of the functions in :data:`FUNCTIONS`, plus ``cast(x, "int64")`` (any Arrow type
      alias: ``"float64"``, ``"string"``, ``"timestamp[ms]"``...).

A filter keeps the rows where the expression is true; null counts as false.

Evaluation does not go through Acero: the parsed tree is also compiled into direct calls of
Arrow compute kernels on the batch's arrays, which avoids a per-batch plan set-up that costs more
than the kernels themselves on typical batches. :func:`parse_expression` still returns the
equivalent ``pyarrow.compute.Expression`` for callers that want one (datasets, pushdown).
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import pyarrow as pa
import pyarrow.compute as pc

from sluice.engine.operators import UserFunctionError

#: longest expression text accepted (a guard against pathological input, not a real limit)
MAX_EXPRESSION_CHARS = 10_000

Value: TypeAlias = pa.Array | pa.ChunkedArray | pa.Scalar
Evaluator = Callable[[pa.RecordBatch], Value]


@dataclass(frozen=True)
class Function:
    """A callable function of the language: an Arrow compute function and how to call it.

    `args` is the (min, max) number of column/expression arguments (max None = any number);
    `options` are names of trailing arguments that must be literals and are passed to
    `make_options` as keywords (each may be omitted from the right when it has a default there).
    """

    arrow_name: str
    args: tuple[int, int | None] = (1, 1)
    options: tuple[str, ...] = ()
    required_options: int = 0
    make_options: Callable[..., pc.FunctionOptions] | None = None


def _substring(pattern: str) -> pc.FunctionOptions:
    return pc.MatchSubstringOptions(pattern)


def _modulo_available() -> bool:
    try:
        pc.get_function("modulo")
        return True
    except (KeyError, pa.ArrowKeyError):  # older Arrow versions lack "modulo"
        return False


#: the functions expressions may call, by the name used in the expression
FUNCTIONS: dict[str, Function] = {
    # numbers
    "abs": Function("abs"),
    "round": Function("round", options=("ndigits",), make_options=lambda ndigits=0: pc.RoundOptions(ndigits=ndigits)),
    "floor": Function("floor"),
    "ceil": Function("ceil"),
    "trunc": Function("trunc"),
    "sqrt": Function("sqrt"),
    "exp": Function("exp"),
    "ln": Function("ln"),
    "log10": Function("log10"),
    "log2": Function("log2"),
    "sign": Function("sign"),
    "power": Function("power", args=(2, 2)),
    "least": Function("min_element_wise", args=(1, None)),
    "greatest": Function("max_element_wise", args=(1, None)),
    # strings
    "lower": Function("utf8_lower"),
    "upper": Function("utf8_upper"),
    "strip": Function("utf8_trim_whitespace"),
    "utf8_length": Function("utf8_length"),
    "length": Function("utf8_length"),
    "starts_with": Function("starts_with", options=("pattern",), required_options=1, make_options=_substring),
    "ends_with": Function("ends_with", options=("pattern",), required_options=1, make_options=_substring),
    "contains": Function("match_substring", options=("pattern",), required_options=1, make_options=_substring),
    "like": Function("match_like", options=("pattern",), required_options=1, make_options=_substring),
    "regex": Function("match_substring_regex", options=("pattern",), required_options=1, make_options=_substring),
    "replace": Function(
        "replace_substring", options=("pattern", "replacement"), required_options=2,
        make_options=lambda pattern, replacement: pc.ReplaceSubstringOptions(pattern, replacement),
    ),
    "substr": Function(
        "utf8_slice_codeunits", options=("start", "stop"), required_options=1,
        make_options=lambda start, stop=None: pc.SliceOptions(start, stop),
    ),
    # nulls and conditions
    "if_else": Function("if_else", args=(3, 3)),
    "coalesce": Function("coalesce", args=(1, None)),
    "is_null": Function("is_null"),
    "is_valid": Function("is_valid"),
    "is_nan": Function("is_nan"),
    # timestamps
    "year": Function("year"),
    "month": Function("month"),
    "day": Function("day"),
    "hour": Function("hour"),
    "minute": Function("minute"),
    "second": Function("second"),
    "day_of_week": Function("day_of_week"),
}
#: special forms, handled by the parser itself
SPECIAL_FUNCTIONS = ("col", "cast")

_BINARY = {
    ast.Add: "add",
    ast.Sub: "subtract",
    ast.Mult: "multiply",
    ast.Div: "divide",
    ast.Pow: "power",
    ast.BitAnd: "and_kleene",
    ast.BitOr: "or_kleene",
}
_COMPARE = {
    ast.Eq: "equal",
    ast.NotEq: "not_equal",
    ast.Lt: "less",
    ast.LtE: "less_equal",
    ast.Gt: "greater",
    ast.GtE: "greater_equal",
}
_BOOL = {ast.And: "and_kleene", ast.Or: "or_kleene"}
_HAS_MODULO = _modulo_available()


class InvalidExpression(ValueError):
    """The text is not an expression of the language; `problem` says what, without the text."""

    def __init__(self, text: str, problem: str) -> None:
        super().__init__(f'{problem} in expression "{text}"')
        self.text = text
        self.problem = problem

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.text, self.problem))


class ExpressionError(UserFunctionError):
    """An expression of an operator failed: it does not parse, or evaluating it on a batch failed
    (a type does not fit, a value is invalid). The job's failure domain is `user`; not retryable
    by default, since an expression is a pure function of its input, which a restart replays."""

    def __init__(self, operator: str, operator_id: str, text: str, problem: str, *, retryable: bool = False) -> None:
        message = f'{operator} {operator_id!r}: expression "{text}": {problem}'
        Exception.__init__(self, message)
        self.operator_id = operator_id
        self.fn_ref = text
        self.what = problem
        self.retryable = retryable
        self.message = message
        self._args = (operator, operator_id, text, problem)

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), self._args, {"retryable": self.retryable})


class MissingColumnError(UserFunctionError, KeyError):
    """An operator needs a column its input batch does not have (a KeyError for callers that test
    for one, with a readable message). Failure domain `user`, not retryable (bad input data)."""

    def __init__(self, operator: str, operator_id: str, column: str, available: Sequence[str], *, role: str = "column",
                 context: str = "") -> None:
        message = (f"{operator} {operator_id!r}: {role} {column!r}{context} is not in the input "
                   f"(columns: {', '.join(available) or 'none'})")
        Exception.__init__(self, message)
        self.operator_id = operator_id
        self.fn_ref = column
        self.what = message
        self.retryable = False
        self.column = column
        self.message = message
        self._args = (operator, operator_id, column, tuple(available))
        self._more = (role, context)

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[Any, ...]:
        return (_missing_column, (*self._args, *self._more))


def _missing_column(operator: str, operator_id: str, column: str, available: Sequence[str], role: str,
                    context: str) -> MissingColumnError:
    return MissingColumnError(operator, operator_id, column, available, role=role, context=context)


class BadInputError(UserFunctionError, ValueError):
    """The input data does not fit what the pipeline says of it (a null event time, a column of
    the wrong type): a ValueError whose failure domain is `user`, not retryable (a restart replays
    the same data). `message` names the operator."""

    def __init__(self, operator_id: str, message: str) -> None:
        Exception.__init__(self, message)
        self.operator_id = operator_id
        self.fn_ref = operator_id
        self.what = message
        self.retryable = False
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.operator_id, self.message))


class BadInputTypeError(BadInputError, TypeError):
    """A :class:`BadInputError` about a column's type (also a TypeError)."""


class _EvalFailure(Exception):
    """Raised inside evaluation by the innermost node that failed; turned into ExpressionError."""

    def __init__(self, segment: str, detail: str) -> None:
        super().__init__(f"{segment!r} {detail}")
        self.segment = segment
        self.detail = detail


def _describe(args: Sequence[Value], labels: Sequence[str]) -> str:
    return ", ".join(f"{label} ({v.type})" for v, label in zip(args, labels))


def _fits(literal: pa.Scalar, target: pa.DataType) -> bool:
    """Whether a literal may be cast to a column's type when a kernel does not take it as it is:
    None takes any type, a string is parsed as a timestamp/date. Nothing else is converted
    silently (comparing a string column with a number stays an error)."""
    return literal.type == pa.null() or (pa.types.is_string(literal.type) and pa.types.is_temporal(target))


def _retyped(args: list[Value]) -> list[Value] | None:
    """`args` with literals cast to the type of the first non-literal argument, or None when no
    literal may be (see :func:`_fits`)."""
    target = next((a.type for a in args if not isinstance(a, pa.Scalar)), None)
    if target is None:
        target = next((a.type for a in args if a.type != pa.null()), None)
    if target is None:
        return None
    changed = False
    out: list[Value] = []
    for a in args:
        if isinstance(a, pa.Scalar) and a.type != target and _fits(a, target):
            try:
                a = a.cast(target)
            except pa.ArrowException:
                return None
            changed = True
        out.append(a)
    return out if changed else None


def _call(name: str, args: list[Value], options: pc.FunctionOptions | None, segment: str,
          labels: Sequence[str]) -> Value:
    try:
        return pc.call_function(name, args, options)
    except pa.ArrowNotImplementedError as exc:
        fixed = _retyped(args)
        if fixed is not None:
            try:
                return pc.call_function(name, fixed, options)
            except pa.ArrowException:
                pass
        raise _EvalFailure(segment, f"cannot be computed for {_describe(args, labels)}: {exc}") from exc
    except pa.ArrowException as exc:
        raise _EvalFailure(segment, f"failed for {_describe(args, labels)}: {exc}") from exc


@dataclass(frozen=True)
class _Node:
    expression: pc.Expression
    evaluate: Evaluator
    literal: Any = None
    is_literal: bool = False
    column: str | None = None
    label: str = ""


class _Translator:
    """One pass over the syntax tree, building the Arrow expression and the evaluator together."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.columns: set[str] = set()

    def fail(self, problem: str) -> InvalidExpression:
        return InvalidExpression(self.text, problem)

    def segment(self, node: ast.AST) -> str:
        return ast.get_source_segment(self.text, node) or type(node).__name__

    def unsupported(self, node: ast.AST, op: ast.AST | None = None) -> InvalidExpression:
        seg = self.segment(node)
        where = "" if seg == self.text else f" ({seg!r})"
        return self.fail(f"unsupported syntax {type(op or node).__name__!r}{where}")

    # -------------------------------------------------------------- leaves

    def literal(self, value: Any) -> _Node:
        try:
            scalar = pa.scalar(value)
        except (pa.ArrowException, OverflowError) as exc:
            raise self.fail(f"literal {value!r} is not representable: {exc}") from exc
        return _Node(pc.scalar(value), lambda _b: scalar, literal=value, is_literal=True, label=repr(value))

    def column(self, name: str) -> _Node:
        self.columns.add(name)
        return _Node(pc.field(name), lambda b: b.column(name), column=name, label=f"column {name!r}")

    def call(self, name: str, args: list[_Node], options: pc.FunctionOptions | None, node: ast.AST) -> _Node:
        seg = self.segment(node)
        evaluators = [a.evaluate for a in args]
        labels = [a.label for a in args]
        expr = pc.Expression._call(name, [a.expression for a in args], options)
        return _Node(expr, lambda b: _call(name, [f(b) for f in evaluators], options, seg, labels), label=repr(seg))

    # -------------------------------------------------------------- tree

    def visit(self, node: ast.AST) -> _Node:
        if isinstance(node, ast.Expression):
            return self.visit(node.body)
        if isinstance(node, ast.Constant):
            if isinstance(node.value, (bool, int, float, str)) or node.value is None:
                return self.literal(node.value)
            raise self.fail(f"unsupported literal {node.value!r}")
        if isinstance(node, ast.Name):
            return self.column(node.id)
        if isinstance(node, ast.UnaryOp):
            return self.unary(node)
        if isinstance(node, ast.BinOp):
            return self.binary(node)
        if isinstance(node, ast.BoolOp):
            fn = _BOOL[type(node.op)]
            out = self.visit(node.values[0])
            for v in node.values[1:]:
                out = self.call(fn, [out, self.visit(v)], None, node)
            return out
        if isinstance(node, ast.Compare):
            return self.compare(node)
        if isinstance(node, ast.Call):
            return self.function(node)
        raise self.unsupported(node)

    def unary(self, node: ast.UnaryOp) -> _Node:
        operand = self.visit(node.operand)
        if isinstance(node.op, ast.UAdd):
            return operand
        if isinstance(node.op, ast.USub):
            if (
                operand.is_literal
                and isinstance(operand.literal, (int, float))
                and not isinstance(operand.literal, bool)
            ):
                return self.literal(-operand.literal)
            return self.call("negate", [operand], None, node)
        if isinstance(node.op, (ast.Not, ast.Invert)):
            return self.call("invert", [operand], None, node)
        raise self.unsupported(node, node.op)

    def binary(self, node: ast.BinOp) -> _Node:
        left, right = self.visit(node.left), self.visit(node.right)
        if isinstance(node.op, ast.Mod):
            if _HAS_MODULO:
                return self.call("modulo", [left, right], None, node)
            # r = a - b * floor(a / b), then moved into the divisor's sign: exact for integers
            # (whose division truncates), Python's result for floats.
            q = self.call("floor", [self.call("divide", [left, right], None, node)], None, node)
            r = self.call("subtract", [left, self.call("multiply", [right, q], None, node)], None, node)
            zero = self.literal(0)
            wrong_sign = self.call("and_kleene", [
                self.call("not_equal", [r, zero], None, node),
                self.call("not_equal", [self.call("less", [r, zero], None, node),
                                        self.call("less", [right, zero], None, node)], None, node),
            ], None, node)
            return self.call("if_else", [wrong_sign, self.call("add", [r, right], None, node), r], None, node)
        fn = _BINARY.get(type(node.op))
        if fn is None:
            raise self.unsupported(node, node.op)
        return self.call(fn, [left, right], None, node)

    def compare(self, node: ast.Compare) -> _Node:
        parts: list[_Node] = []
        left_node: ast.AST = node.left
        left = self.visit(left_node)
        for op, right_node in zip(node.ops, node.comparators):
            if isinstance(op, (ast.In, ast.NotIn)):
                part = self.membership(left, right_node, node)
                if isinstance(op, ast.NotIn):
                    part = self.call("invert", [part], None, node)
                right = None
            elif isinstance(op, (ast.Is, ast.IsNot)):
                if not (isinstance(right_node, ast.Constant) and right_node.value is None):
                    raise self.fail(f"'is' only compares with None ({self.segment(node)!r})")
                part = self.call("is_null" if isinstance(op, ast.Is) else "is_valid", [left], None, node)
                right = None
            else:
                fn = _COMPARE.get(type(op))
                if fn is None:
                    raise self.unsupported(node, op)
                right = self.visit(right_node)
                part = self.call(fn, [left, right], None, node)
            parts.append(part)
            if right is None and len(node.ops) > 1:
                raise self.fail(f"'in' and 'is' cannot be chained ({self.segment(node)!r})")
            left = right if right is not None else left
        out = parts[0]
        for p in parts[1:]:
            out = self.call("and_kleene", [out, p], None, node)
        return out

    def membership(self, left: _Node, container: ast.AST, node: ast.AST) -> _Node:
        if not isinstance(container, (ast.List, ast.Tuple, ast.Set)):
            raise self.fail(f"'in' needs a literal list ({self.segment(node)!r})")
        values = [self.visit(e) for e in container.elts]
        if any(not v.is_literal for v in values):
            raise self.fail(f"'in' needs a list of literals ({self.segment(container)!r})")
        if not values:
            return self.literal(False)
        try:
            value_set = pa.array([v.literal for v in values])
        except (pa.ArrowException, OverflowError) as exc:
            raise self.fail(f"the values of 'in' must share one type ({self.segment(container)!r})") from exc
        expr = pc.Expression._call("is_in", [left.expression], pc.SetLookupOptions(value_set))
        seg = self.segment(node)
        original = pc.SetLookupOptions(value_set)
        by_type: dict[pa.DataType, pc.FunctionOptions] = {}
        get = left.evaluate

        def evaluate(b: pa.RecordBatch) -> Value:
            arg = get(b)
            options = by_type.get(arg.type)
            if options is None:
                # The literal list was typed from Python values; Arrow compares it with many
                # column types as it is, else it is cast to the column's type (once per type).
                try:
                    result = pc.call_function("is_in", [arg], original)
                    by_type[arg.type] = original
                    return result
                except (pa.ArrowTypeError, pa.ArrowNotImplementedError):
                    pass
                numeric = pa.types.is_integer(value_set.type) or pa.types.is_floating(value_set.type)
                convertible = ((numeric and (pa.types.is_integer(arg.type) or pa.types.is_floating(arg.type)))
                               or (pa.types.is_string(value_set.type) and pa.types.is_temporal(arg.type)))
                try:
                    if not convertible:
                        raise pa.ArrowTypeError("no implicit conversion")
                    options = pc.SetLookupOptions(value_set.cast(arg.type))
                except pa.ArrowException as exc:
                    raise _EvalFailure(seg, f"cannot compare {_describe([arg], [left.label])} with the listed values "
                                            f"({value_set.type}): {exc}") from exc
                by_type[arg.type] = options
            return _call("is_in", [arg], options, seg, [left.label])

        return _Node(expr, evaluate, label=repr(seg))

    def literal_argument(self, node: ast.AST, fn: str, what: str) -> Any:
        arg = self.visit(node)
        if not arg.is_literal:
            raise self.fail(f"argument {what!r} of {fn}() must be a literal ({self.segment(node)!r})")
        return arg.literal

    def function(self, node: ast.Call) -> _Node:
        if not isinstance(node.func, ast.Name):
            raise self.unsupported(node.func)
        name = node.func.id
        if node.keywords:
            raise self.fail(f"keyword arguments are not supported ({self.segment(node)!r})")
        if any(isinstance(a, ast.Starred) for a in node.args):
            raise self.fail(f"'*' arguments are not supported ({self.segment(node)!r})")
        if name == "col":
            if len(node.args) != 1 or not (
                isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
            ):
                raise self.fail(f"col() takes one string literal, the column name ({self.segment(node)!r})")
            return self.column(node.args[0].value)
        if name == "cast":
            if len(node.args) != 2:
                raise self.fail(f"cast() takes a value and a type name ({self.segment(node)!r})")
            type_name = self.literal_argument(node.args[1], "cast", "type")
            try:
                target = pa.type_for_alias(type_name) if isinstance(type_name, str) else None
            except (ValueError, KeyError) as exc:
                raise self.fail(f"unknown type {type_name!r} in cast()") from exc
            if target is None:
                raise self.fail(f"cast() needs a type name string, got {type_name!r}")
            value = self.visit(node.args[0])
            seg = self.segment(node)
            options = pc.CastOptions.safe(target)
            labels = [value.label]
            f = value.evaluate
            return _Node(pc.Expression._call("cast", [value.expression], options),
                         lambda b: _call("cast", [f(b)], options, seg, labels), label=repr(seg))
        spec = FUNCTIONS.get(name)
        if spec is None:
            raise self.fail(f"unknown function {name!r} (known: {', '.join(sorted([*FUNCTIONS, *SPECIAL_FUNCTIONS]))})")
        lo, hi = spec.args
        # functions with options take a fixed number of data arguments, then the options
        n_data = lo if spec.options else len(node.args)
        n_opts = len(node.args) - n_data
        if n_data < lo or (hi is not None and n_data > hi) or not spec.required_options <= n_opts <= len(spec.options):
            want = f"{lo}" if hi == lo else f"{lo} or more" if hi is None else f"{lo} to {hi}"
            if spec.options:
                want += f" plus {', '.join(spec.options)}"
            raise self.fail(f"{name}() takes {want} arguments, got {len(node.args)} ({self.segment(node)!r})")
        data = [self.visit(a) for a in node.args[:n_data]]
        opts = {o: self.literal_argument(a, name, o) for o, a in zip(spec.options, node.args[n_data:])}
        options = None
        if spec.make_options is not None:
            try:
                options = spec.make_options(**opts)
            except (TypeError, ValueError, pa.ArrowException) as exc:
                raise self.fail(f"bad arguments for {name}(): {exc}") from exc
        return self.call(spec.arrow_name, data, options, node)


def _translate(text: str) -> tuple[_Node, set[str]]:
    if not isinstance(text, str):
        raise InvalidExpression(repr(text), f"an expression must be a string, not {type(text).__name__}")
    if not text.strip():
        raise InvalidExpression(text, "nothing to evaluate")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise InvalidExpression(text[:80] + "...", f"longer than {MAX_EXPRESSION_CHARS} characters")
    source = text.strip()
    try:
        tree = ast.parse(source, mode="eval")
    except SyntaxError as exc:
        where = f" at column {exc.offset}" if exc.offset else ""
        detail = "" if exc.msg == "invalid syntax" else f": {exc.msg}"
        raise InvalidExpression(source, f"invalid syntax{where}{detail}") from exc
    except (RecursionError, MemoryError, ValueError) as exc:
        raise InvalidExpression(source, f"cannot parse: {type(exc).__name__}: {exc}") from exc
    translator = _Translator(source)
    try:
        node = translator.visit(tree)
    except RecursionError as exc:
        raise InvalidExpression(source, "too deeply nested") from exc
    return node, translator.columns


def parse_expression(text: str) -> pc.Expression:
    """The Arrow compute expression for `text`. Raises ValueError naming the expression and the
    offending part for anything outside the language."""
    return _translate(text)[0].expression


def columns_of(text: str) -> set[str]:
    """The column names `text` reads (for checking against a declared schema). Raises ValueError
    like :func:`parse_expression`."""
    return set(_translate(text)[1])


@dataclass(frozen=True)
class CompiledExpression:
    """A parsed expression, ready to evaluate on batches; `column` is set when it is nothing but
    a column reference (its value is then the batch's own column, zero-copy)."""

    text: str
    expression: pc.Expression
    columns: frozenset[str]
    column: str | None
    _evaluate: Evaluator

    def check_columns(self, batch: pa.RecordBatch | pa.Table, operator: str, operator_id: str) -> None:
        """Raise MissingColumnError when `batch` lacks a column the expression reads (or has it twice)."""
        names = batch.schema.names
        for c in self.columns:
            if batch.schema.get_field_index(c) < 0:
                if c in names:
                    raise ExpressionError(
                        operator, operator_id, self.text, f"column {c!r} appears more than once in the input"
                    )
                raise MissingColumnError(operator, operator_id, c, names,
                                         context=f' (read by expression "{self.text}")')

    def evaluate(self, batch: pa.RecordBatch, operator: str, operator_id: str) -> Value:
        """The expression's value on `batch`: an array of batch.num_rows values, or a scalar when
        it reads no column. Raises MissingColumnError / ExpressionError naming `operator`,
        `operator_id`, the expression and what failed."""
        self.check_columns(batch, operator, operator_id)
        try:
            return self._evaluate(batch)
        except _EvalFailure as exc:
            problem = exc.detail if exc.segment == self.text else f"{exc.segment!r} {exc.detail}"
            raise ExpressionError(operator, operator_id, self.text, problem) from exc.__cause__
        except pa.ArrowException as exc:
            raise ExpressionError(operator, operator_id, self.text, str(exc)) from exc


def compile_expression(text: str) -> CompiledExpression:
    """Parse `text` once for repeated evaluation. Raises ValueError like :func:`parse_expression`."""
    node, columns = _translate(text)
    return CompiledExpression(text, node.expression, frozenset(columns), node.column, node.evaluate)


def compile_for(operator: str, operator_id: str, text: str) -> CompiledExpression:
    """:func:`compile_expression` for an operator's open(): a bad expression raises an
    ExpressionError naming the operator and the expression."""
    try:
        return compile_expression(text)
    except InvalidExpression as exc:
        raise ExpressionError(operator, operator_id, text, exc.problem) from exc


def as_array(value: Value, num_rows: int) -> pa.Array | pa.ChunkedArray:
    """`value` as a column of `num_rows` values (a scalar is repeated)."""
    if isinstance(value, pa.Scalar):
        return pa.repeat(value, num_rows)
    return value


__all__ = [
    "FUNCTIONS",
    "BadInputError",
    "BadInputTypeError",
    "CompiledExpression",
    "ExpressionError",
    "Function",
    "InvalidExpression",
    "MissingColumnError",
    "as_array",
    "columns_of",
    "compile_expression",
    "compile_for",
    "parse_expression",
]

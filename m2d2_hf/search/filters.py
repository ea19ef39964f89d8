"""Metadata filters of a search (`where=`): a small predicate language over the columns of an index's sounds,
parsed here into a pyarrow compute expression (user text is never evaluated, nor pasted into SQL).

    label = 'dog'                       strings in single quotes ('' is a quote inside one)
    duration < 5 and split != 'train'   numbers; =, ==, !=, <>, <, <=, >, >=
    split in ('test', 'train')          in / not in a list of values
    path like '%/dogs/%'                SQL LIKE: % any run of characters, _ one character
    caption is not null                 is null / is not null
    not (label = 'dog' or label = 'cat') and / or / not, parentheses (not binds tightest, then and, then or)

Column names are identifiers (letters, digits, `_`, not starting with a digit) or double-quoted ("file name").
A comparison with a missing value (null) is false, whatever `not` says around it, as in SQL.
"""

import re
from collections.abc import Sequence
from typing import Any


MAX_DEPTH = 32
SYNTAX = "e.g. label = 'dog' and duration < 5, split in ('test', 'train'), path like '%dog%'"
_TOKEN = re.compile(
    r"""\s*(?:
      (?P<string>'(?:[^']|'')*')
    | (?P<quoted>"[^"]+")
    | (?P<number>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)
    | (?P<op><=|>=|!=|<>|==|=|<|>|\(|\)|,)
    | (?P<word>[A-Za-z_][A-Za-z0-9_]*)
    )""",
    re.VERBOSE,
)
_KEYWORDS = {"and", "or", "not", "in", "like", "is", "null", "true", "false"}
_COMPARISONS = {"=": "==", "==": "==", "!=": "!=", "<>": "!=", "<": "<", "<=": "<=", ">": ">", ">=": ">="}


class FilterError(ValueError):
    """A `where` filter that does not parse, or names a column the index does not have."""


def _tokens(text: str) -> list[tuple[str, Any, int]]:
    """(kind, value, position) of each token: kinds string, column, number, op, keyword, end."""
    tokens, position = [], 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None or match.end() == position:
            if not text[position:].strip():
                break
            at = position + len(text[position:]) - len(text[position:].lstrip())
            raise FilterError(f"unexpected character {text[at]!r} at position {at + 1}")
        kind = match.lastgroup
        value, start = match.group(kind), match.start(kind)
        if kind == "string":
            tokens.append(("string", value[1:-1].replace("''", "'"), start))
        elif kind == "quoted":
            tokens.append(("column", value[1:-1], start))
        elif kind == "number":
            tokens.append(("number", float(value) if re.search(r"[.eE]", value) else int(value), start))
        elif kind == "word" and value.lower() in _KEYWORDS:
            tokens.append(("keyword", value.lower(), start))
        else:
            tokens.append((kind if kind == "op" else "column", value, start))
        position = match.end()
    tokens.append(("end", None, len(text)))
    return tokens


class _Parser:
    def __init__(self, text: str, schema):
        import pyarrow.compute as pc

        self.pc, self.schema = pc, schema
        self.tokens = _tokens(text)
        self.at = 0

    def peek(self) -> tuple[str, Any, int]:
        return self.tokens[self.at]

    def take(self) -> tuple[str, Any, int]:
        token = self.tokens[self.at]
        self.at += 1
        return token

    def accept(self, kind: str, value: Any) -> bool:
        if self.peek()[:2] == (kind, value):
            self.at += 1
            return True
        return False

    def expect(self, kind: str, value: Any, what: str) -> None:
        if not self.accept(kind, value):
            self.fail(f"expected {what}")

    def fail(self, problem: str) -> None:
        kind, value, position = self.peek()
        found = "the end" if kind == "end" else repr(value if kind != "string" else f"'{value}'")
        raise FilterError(f"{problem} at position {position + 1}, found {found}")

    def parse(self):
        expression = self.disjunction(0)
        if self.peek()[0] != "end":
            self.fail("expected and / or or the end")
        return expression

    def disjunction(self, depth: int):
        if depth > MAX_DEPTH:
            self.fail(f"nested more than {MAX_DEPTH} deep")
        expression = self.conjunction(depth)
        while self.accept("keyword", "or"):
            expression = expression | self.conjunction(depth)
        return expression

    def conjunction(self, depth: int):
        expression = self.negation(depth)
        while self.accept("keyword", "and"):
            expression = expression & self.negation(depth)
        return expression

    def negation(self, depth: int):
        if self.accept("keyword", "not"):
            if depth > MAX_DEPTH:
                self.fail(f"nested more than {MAX_DEPTH} deep")
            return ~self.negation(depth + 1)
        if self.accept("op", "("):
            expression = self.disjunction(depth + 1)
            self.expect("op", ")", "')'")
            return expression
        return self.comparison()

    def column(self) -> tuple[str, str]:
        """The name of the column at the cursor and its kind: string, number or bool."""
        import pyarrow as pa

        kind, name, _ = self.peek()
        if kind != "column":
            self.fail("expected a column name")
        if name not in self.schema.names:
            raise FilterError(f"no column {name!r} in this index; its columns are {', '.join(self.schema.names)}")
        self.take()
        type_ = self.schema.field(name).type
        if pa.types.is_string(type_) or pa.types.is_large_string(type_):
            return name, "string"
        if pa.types.is_boolean(type_):
            return name, "bool"
        return name, "number"

    def value(self, name: str, kind: str) -> Any:
        token, value, _ = self.peek()
        found = {"string": "string", "number": "number", "keyword": "bool"}.get(token)
        if token == "keyword" and value not in ("true", "false"):
            found = None
        if found is None:
            self.fail(f"expected a value for {name}")
        if found != kind:
            self.fail(f"{name} holds {kind}s: compare it with a {kind}")
        self.take()
        return {"true": True, "false": False}.get(value, value) if token == "keyword" else value

    def comparison(self):
        import pyarrow as pa

        pc = self.pc
        name, kind = self.column()
        field = pc.field(name)
        if self.accept("keyword", "is"):
            negated = self.accept("keyword", "not")
            self.expect("keyword", "null", "null")
            return field.is_valid() if negated else field.is_null()
        negated = self.accept("keyword", "not")
        if self.accept("keyword", "in"):
            self.expect("op", "(", "'(' after in")
            values = [self.value(name, kind)]
            while self.accept("op", ","):
                values.append(self.value(name, kind))
            self.expect("op", ")", "',' or ')'")
            if kind == "number":  # one value type for the set, whatever mix of ints and floats was written
                field, values = field.cast(pa.float64()), pa.array(values, pa.float64())
            found = field.isin(values)
            # isin is false (not null) for a missing value: keep SQL's "a missing value matches nothing".
            return (~found & field.is_valid()) if negated else found
        if self.accept("keyword", "like"):
            if kind != "string":
                self.fail(f"like compares strings and {name} holds {kind}s")
            matched = pc.match_like(field, self.value(name, kind))
            return ~matched if negated else matched
        if negated:
            self.fail("expected in or like after not")
        token, op, _ = self.peek()
        if token != "op" or op not in _COMPARISONS:
            self.fail(f"expected a comparison (=, !=, <, <=, >, >=, in, like, is null) after {name}")
        self.take()
        value = self.value(name, kind)
        return {
            "==": field.__eq__,
            "!=": field.__ne__,
            "<": field.__lt__,
            "<=": field.__le__,
            ">": field.__gt__,
            ">=": field.__ge__,
        }[_COMPARISONS[op]](value)


def parse_filter(text: str, schema):
    """The pyarrow compute expression of the filter `text` over a table of `schema`; `FilterError` (one line naming
    the problem, where it is and the syntax) when it does not parse or names a missing column."""
    if not isinstance(text, str) or not text.strip():
        raise FilterError(f"empty filter: write a predicate, {SYNTAX}")
    try:
        return _Parser(text, schema).parse()
    except FilterError as error:
        raise FilterError(f"invalid filter {text!r}: {error} ({SYNTAX})") from None


def matching_rows(table, text: str) -> Sequence[int]:
    """The numbers (ascending) of the rows of `table` (a pyarrow Table) for which the filter `text` is true."""
    import numpy as np
    import pyarrow as pa

    expression = parse_filter(text, table.schema)
    numbered = table.append_column("__row", pa.array(np.arange(len(table), dtype=np.int64)))
    try:
        kept = numbered.filter(expression)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as error:
        raise FilterError(f"invalid filter {text!r}: {str(error).splitlines()[0]} ({SYNTAX})") from None
    return kept.column("__row").to_numpy()


__all__ = ["FilterError", "SYNTAX", "matching_rows", "parse_filter"]

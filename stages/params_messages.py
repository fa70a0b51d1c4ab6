"""Messages for params.yaml problems: one line naming the key, the value and what was
expected (`models.toy-a.arch.d_model = -4, expected an integer ≥ 1`).

pydantic reports an error's location and type; `message` reads that location against the
schema (dropping the tags pydantic inserts for tagged unions, e.g. `models.<name>.toy`)
and describes the expected value from the field's type and bounds. Validators raise
`KeyProblem` for a problem that involves several keys: it carries the key, the value and
the expectation, so no message is ever parsed back out of another schema's error text.
"""

from __future__ import annotations

import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, Tag
from pydantic.fields import FieldInfo

MISSING = object()  # a KeyProblem's value for a key that is not there
NO_VALUE = object()  # a KeyProblem about a whole entry: no "= value"


class ParamsError(ValueError):
    """A bad value in params.yaml; the message is one line naming key, value, expectation."""


class KeyProblem(ValueError):
    """A problem that knows which key is at fault: `loc` from where it is raised (the
    root for Params' checks, the model for a nested model's validator).

    `text` is what the error says where no params file is involved (a config built in
    code, e.g. `TopKConfig(k=9, d_sae=8)`); by default the expectation alone."""

    def __init__(self, loc: tuple, value: Any, expected: str, text: str | None = None):
        super().__init__(text or expected)
        self.loc, self.value, self.expected = loc, value, expected

    def render(self, at: tuple = ()) -> str:
        key = dotted((*at, *self.loc))
        if self.value is MISSING:
            return f"{key} is missing, {self.expected}"
        if self.value is NO_VALUE:
            return f"{key}: {self.expected}"
        return key_value(key, self.value, self.expected)


class Said(ValueError):
    """A message already naming its key (from a nested validation)."""


# ---------------------------------------------------------------------------- messages


def _unwrap(tp: Any) -> tuple[Any, list]:
    """(type, metadata) with any Annotated layers taken off."""
    metas: list = []
    while get_origin(tp) is Annotated:
        metas += tp.__metadata__
        tp = get_args(tp)[0]
    return tp, metas


def _members(tp: Any) -> list | None:
    """The non-None members of a union, or None when `tp` is not one."""
    if get_origin(tp) not in (Union, types.UnionType):
        return None
    return [a for a in get_args(tp) if a is not type(None)]


def _tag_of(member: Any, discriminator: Any) -> list:
    tp, metas = _unwrap(member)
    tags = [m.tag for m in metas if isinstance(m, Tag)]
    if isinstance(discriminator, str) and isinstance(tp, type) and issubclass(tp, BaseModel):
        tags += get_args(tp.model_fields[discriminator].annotation)
    return tags


def walk(root: Any, loc: tuple) -> tuple[tuple, Any, list, bool]:
    """Read pydantic's error location against the schema `root`: the location without
    the tags pydantic adds (a tagged union's tag, e.g. `models.<name>.toy`), the type and
    constraints at its end (None when the schema does not say, e.g. in a dict[str, Any]),
    and whether it stopped early at an untagged union (then the union as a whole is meant)."""
    out: list = []
    tp, metas = root, []
    parts = list(loc)
    while parts:
        tp, more = _unwrap(tp)
        metas += more
        members = _members(tp)
        if members is not None:
            # Field(discriminator="source") or Discriminator(callable)
            disc = next((d for m in metas if (d := getattr(m, "discriminator", None))), None)
            if len(members) == 1:
                tp = members[0]
            elif disc is None:
                return tuple(out), tp, metas, True
            else:
                tag = parts.pop(0)
                tp = next((m for m in members if tag in _tag_of(m, disc)), None)
                metas = []
                if tp is None:
                    return (*out, *parts), None, [], False
            continue
        p = parts.pop(0)
        origin, args = get_origin(tp), get_args(tp)
        out.append(p)
        if isinstance(tp, type) and issubclass(tp, BaseModel) and p in tp.model_fields:
            f = tp.model_fields[p]
            tp, metas = f.annotation, [*f.metadata, *([f] if f.discriminator else [])]
        elif origin is dict and args:
            tp, metas = args[1], []
        elif origin in (list, tuple, set) and args and isinstance(p, int):
            tp = args[0] if origin is not tuple or args[-1] is ... else args[min(p, len(args) - 1)]
            metas = []
        else:
            return (*out, *parts), None, [], False
    tp, more = _unwrap(tp)
    return tuple(out), tp, metas + more, False


def or_list(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} or {items[-1]}"


def _num(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _bounds(metas: list) -> str:
    b: dict[str, Any] = {}
    for m in metas:
        for sub in m.metadata if isinstance(m, FieldInfo) else [m]:
            for name in ("ge", "gt", "le", "lt"):
                if getattr(sub, name, None) is not None:
                    b[name] = getattr(sub, name)
    lo = ("[", b["ge"]) if "ge" in b else ("(", b["gt"]) if "gt" in b else None
    hi = (b["le"], "]") if "le" in b else (b["lt"], ")") if "lt" in b else None
    if lo and hi:
        return f" in {lo[0]}{_num(lo[1])}, {_num(hi[0])}{hi[1]}"
    if lo:
        return f" {'≥' if lo[0] == '[' else '>'} {_num(lo[1])}"
    if hi:
        return f" {'≤' if hi[1] == ']' else '<'} {_num(hi[0])}"
    return ""


def _describe(tp: Any, metas: list | tuple = ()) -> str:
    """What a value of schema type `tp` looks like, in words: 'an integer ≥ 1'."""
    tp, more = _unwrap(tp)
    metas = [*metas, *more]
    if (members := _members(tp)) is not None:
        null = ["null"] if type(None) in get_args(tp) else []
        return or_list([_describe(m, metas if len(members) == 1 else []) for m in members] + null)
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return or_list([repr(a) for a in args])
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer" + _bounds(metas)
    if tp is float:
        return "a number" + _bounds(metas)
    if tp is str:
        return "a string"
    if origin in (list, tuple, set) or tp in (list, tuple, set):
        item = _unwrap(args[0])[0] if args else None
        of = {str: " of strings", int: " of integers", float: " of numbers"}
        return "a list" + of.get(item, "")
    if origin is dict or tp is dict or (isinstance(tp, type) and issubclass(tp, BaseModel)):
        return "a mapping"
    return "a valid value"


_FALLBACK = {  # what was expected, by pydantic error type, when the schema does not say
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "tuple_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
}


def expected_for(e: dict, tp: Any, metas: list) -> str:
    """'expected …' for one pydantic error at a value of type `tp` (None: unknown)."""
    ctx = e.get("ctx") or {}
    if e["type"] == "value_error":  # a validator's words: "expected ..." or a sentence
        return str(ctx.get("error", e["msg"]))
    if tp is not None:
        return f"expected {_describe(tp, metas)}"
    if e["type"] in _FALLBACK:
        return f"expected {_FALLBACK[e['type']]}"
    bound = {"greater_than_equal": "≥ {ge}", "greater_than": "> {gt}", "less_than": "< {lt}",
             "less_than_equal": "≤ {le}"}.get(e["type"])  # fmt: skip
    if bound:
        return "expected a number " + bound.format(**ctx)
    msg = e["msg"].removeprefix("Value error, ")
    return msg[:1].lower() + msg[1:]


def key_value(key: str, value: Any, expected: str) -> str:
    """`key = value, expected …`; a long mapping or list is named, not printed."""
    if isinstance(value, dict | list) and len(repr(value)) > 60:
        kind = "a mapping" if isinstance(value, dict) else f"a list of {len(value)}"
        return f"{key}: {expected}, got {kind}"
    return f"{key} = {value!r}, {expected}"


def _lookup(raw: Any, loc: tuple) -> Any:
    for p in loc:
        try:
            raw = raw[p]
        except (KeyError, IndexError, TypeError):
            return MISSING
    return raw


def message(e: dict, root: Any, raw: Any, prefix: tuple = ()) -> str:
    """One pydantic error of validating `raw` against `root`, as one line without the
    file name: `models.toy-a.arch.d_model = -4, expected an integer ≥ 1`."""
    ctx = e.get("ctx") or {}
    loc, tp, metas, whole = walk(root, e["loc"])
    err = ctx.get("error")
    if isinstance(err, Said):
        return str(err)
    if isinstance(err, KeyProblem):
        return err.render((*prefix, *loc))
    key = dotted((*prefix, *loc)) or "<root>"
    kind = e["type"]
    if whole:  # an untagged union: what the key holds, against the union as a whole
        return key_value(key, _lookup(raw, loc), f"expected {_describe(tp)}")
    if kind == "extra_forbidden":
        parent = walk(root, e["loc"][:-1])[1]
        known = list(parent.model_fields) if isinstance(parent, type) and issubclass(
            parent, BaseModel) else []  # fmt: skip
        return f"{key}: unknown key, expected one of {', '.join(known) or 'no other keys'}"
    if kind == "missing":
        return f"{key} is missing, expected {_describe(tp, metas) if tp is not None else 'a value'}"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        name = str(ctx.get("discriminator", "")).strip("'")
        tags = [repr(t) for m in (_members(tp) or []) for t in _tag_of(m, name)]
        expected = f"expected {or_list(tags)}" if tags else f"expected {ctx.get('expected_tags')}"
        if kind == "union_tag_not_found":
            return f"{key}.{name} is missing, {expected}"
        return f"{key}.{name} = {ctx.get('tag')!r}, {expected}"
    expected = expected_for(e, tp, metas)
    if kind == "value_error" and not expected.startswith("expected"):
        return f"{key}: {expected}"
    return key_value(key, e.get("input"), expected)


def dotted(loc: tuple) -> str:
    parts = []
    for p in loc:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        else:
            parts.append(("." if parts else "") + str(p))
    return "".join(parts)

"""Schemas structured output cannot honour: the ones no value matches, and `not`, which the grammar ignores.

xgrammar compiles a JSON schema into a grammar and refuses some schemas that match nothing (`enum: []`,
`false`), but it ignores `not` and merges `allOf` loosely: `{"not": {}}` or `allOf` of a string and an
integer compile, and the output then cannot match the schema the client asked for. `schema_problem` finds
what a grammar would silently get wrong, before it is compiled, so the request is a 400 instead:

* a (sub)schema that no value matches, where a value must be: `false`, `enum: []`, `type: []`, a `const`
  or every `enum` value outside `type`, `anyOf` / `oneOf` with no possible member, `allOf` whose members'
  types do not meet or that holds an impossible member, bounds that cross (minimum > maximum, minLength >
  maxLength, minItems > maxItems, minProperties > maxProperties), a required property that nothing matches
  or that `additionalProperties: false` forbids, array items that nothing matches when minItems >= 1;
* `not`, in any form (OpenAI's structured outputs refuse it too).

Only the evident cases: satisfiability of JSON schema in general is undecidable in practice (`$ref`s are not
followed, `pattern`s not intersected). No torch here.
"""

from __future__ import annotations

from typing import Any

JSON_TYPES = frozenset({"null", "boolean", "object", "array", "number", "integer", "string"})
MAX_DEPTH = 64
_BOUNDS = (("minimum", "maximum"), ("minLength", "maxLength"), ("minItems", "maxItems"),
           ("minProperties", "maxProperties"))
_PYTHON_TYPES = {"null": (type(None),), "boolean": (bool,), "object": (dict,), "array": (list,),
                 "string": (str,), "number": (int, float), "integer": (int,)}


def schema_problem(schema: Any) -> str | None:
    """Why structured output cannot honour `schema` (with a JSON-pointer-like path), or None."""
    return _not_used(schema, "#", 0) or _unsatisfiable(schema, "#", 0)


# Keywords whose value is a subschema, a list of them, or a mapping of names to them.
_ONE = ("items", "additionalProperties", "contains", "propertyNames", "if", "then", "else",
        "additionalItems", "unevaluatedItems", "unevaluatedProperties")
_LIST = ("allOf", "anyOf", "oneOf", "prefixItems")
_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def _not_used(schema: Any, path: str, depth: int) -> str | None:
    """`not` anywhere a subschema may be (the grammar would ignore it)."""
    if depth > MAX_DEPTH:
        return f"{path}: the schema is nested more than {MAX_DEPTH} levels deep"
    if not isinstance(schema, dict):
        return None
    if "not" in schema:
        return f"{path}: `not` is not supported in structured output (the output could not be held to it)"
    for key, sub in _subschemas(schema, path):
        if problem := _not_used(sub, key, depth + 1):
            return problem
    return None


def _subschemas(schema: dict, path: str) -> list[tuple[str, Any]]:
    subs = [(f"{path}/{k}", schema[k]) for k in _ONE if k in schema]
    subs += [(f"{path}/{k}/{i}", m) for k in _LIST if isinstance(schema.get(k), list) for i, m in enumerate(schema[k])]
    subs += [(f"{path}/{k}/{n}", m) for k in _MAP if isinstance(schema.get(k), dict) for n, m in schema[k].items()]
    return subs


def _unsatisfiable(schema: Any, path: str, depth: int) -> str | None:
    """Why no value matches `schema`, where the output must hold one; None when that is not evident."""
    if depth > MAX_DEPTH:
        return f"{path}: the schema is nested more than {MAX_DEPTH} levels deep"
    if schema is False:
        return f"{path}: `false` matches no value"
    if not isinstance(schema, dict):
        return None
    for check in (_type_problem, _value_problem, _bounds_problem):
        problem = check(schema, path)
        if problem:
            return problem
    return _nested_problem(schema, path, depth)


def allowed_types(schema: dict) -> frozenset[str] | None:
    """The JSON types `schema` (and its allOf members) allow, integer inside number; None: any."""
    allowed: frozenset[str] | None = None
    for part in (schema, *(m for m in schema.get("allOf", ()) if isinstance(m, dict))):
        declared = part.get("type")
        if declared is None:
            continue
        names = {declared} if isinstance(declared, str) else set(declared)
        if "number" in names:
            names.add("integer")
        allowed = frozenset(names & JSON_TYPES) if allowed is None else allowed & names
    return allowed


def _type_problem(schema: dict, path: str) -> str | None:
    allowed = allowed_types(schema)
    if allowed is not None and not allowed:
        return f"{path}: its types (with allOf's) have nothing in common: no value matches"
    return None


def _value_problem(schema: dict, path: str) -> str | None:
    allowed = allowed_types(schema)
    if "enum" in schema and isinstance(schema["enum"], list):
        values = schema["enum"]
        if not any(_is_a(v, allowed) for v in values):
            return f"{path}: no value of enum {str(values)[:80]} has the schema's type"
    if "const" in schema and not _is_a(schema["const"], allowed):
        return f"{path}: const {str(schema['const'])[:80]} does not have the schema's type"
    return None


def _is_a(value: Any, allowed: frozenset[str] | None) -> bool:
    if allowed is None:
        return True
    if isinstance(value, bool):  # a bool is an int to Python, never a number to JSON
        return "boolean" in allowed
    if isinstance(value, float) and value.is_integer() and "integer" in allowed:
        return True
    return any(isinstance(value, _PYTHON_TYPES[t]) for t in allowed)


def _bounds_problem(schema: dict, path: str) -> str | None:
    for low, high in _BOUNDS:
        lo, hi = schema.get(low), schema.get(high)
        if _number(lo) and _number(hi) and lo > hi:
            return f"{path}: {low} {lo} is above {high} {hi}: no value matches"
    lo, hi = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    if _number(lo) and _number(hi) and lo >= hi:
        return f"{path}: exclusiveMinimum {lo} is not below exclusiveMaximum {hi}: no value matches"
    return None


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _nested_problem(schema: dict, path: str, depth: int) -> str | None:
    for member, i in _members(schema, "allOf"):
        if problem := _unsatisfiable(member, f"{path}/allOf/{i}", depth + 1):
            return problem
    for key in ("anyOf", "oneOf"):
        members = schema.get(key)
        if isinstance(members, list):
            problems = [_unsatisfiable(m, f"{path}/{key}/{i}", depth + 1) for i, m in enumerate(members)]
            if all(problems):
                return problems[0] if problems else f"{path}: {key} is empty: no value matches"
    return _object_problem(schema, path, depth) or _array_problem(schema, path, depth)


def _members(schema: dict, key: str) -> list[tuple[Any, int]]:
    members = schema.get(key)
    return [(m, i) for i, m in enumerate(members)] if isinstance(members, list) else []


def _object_problem(schema: dict, path: str, depth: int) -> str | None:
    properties = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
    required = schema.get("required") if isinstance(schema.get("required"), list) else []
    for name in required:
        if name in properties:
            if problem := _unsatisfiable(properties[name], f"{path}/properties/{name}", depth + 1):
                return problem
        elif schema.get("additionalProperties") is False:
            return f"{path}: property {name!r} is required but additionalProperties is false"
    return None


def _array_problem(schema: dict, path: str, depth: int) -> str | None:
    items = schema.get("items")
    if isinstance(items, (dict, bool)) and _number(schema.get("minItems")) and schema["minItems"] >= 1:
        return _unsatisfiable(items, f"{path}/items", depth + 1)
    return None

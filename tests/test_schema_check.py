"""Schemas structured output cannot honour are found before a grammar silently ignores what makes them so."""

import pytest

from k2serve.worker.request import GuidedSpec, RequestRejected
from k2serve.worker.schema_check import schema_problem

UNSATISFIABLE = [
    ({"not": {}}, "`not`"),
    ({"allOf": [{"type": "string"}, {"type": "integer"}]}, "nothing in common"),
    ({"type": "string", "allOf": [{"type": ["integer", "null"]}]}, "nothing in common"),
    ({"enum": []}, "enum"),
    ({"type": []}, "nothing in common"),
    ({"type": "integer", "const": "a"}, "const"),
    ({"type": "string", "enum": [1, 2]}, "enum"),
    ({"anyOf": []}, "empty"),
    ({"oneOf": [False, {"enum": []}]}, "`false`"),
    ({"allOf": [{"type": "object"}, False]}, "`false`"),
    ({"type": "integer", "minimum": 5, "maximum": 2}, "minimum 5"),
    ({"type": "number", "exclusiveMinimum": 2, "exclusiveMaximum": 2}, "exclusiveMinimum"),
    ({"type": "string", "minLength": 3, "maxLength": 1}, "minLength"),
    ({"type": "array", "minItems": 2, "maxItems": 1}, "minItems"),
    ({"type": "array", "items": False, "minItems": 1}, "#/items"),
    ({"type": "object", "properties": {"a": {"enum": []}}, "required": ["a"]}, "#/properties/a"),
    ({"type": "object", "properties": {}, "required": ["a"], "additionalProperties": False}, "'a' is required"),
    ({"type": "object", "properties": {"a": {"type": "string", "not": {"const": "x"}}}}, "#/properties/a: `not`"),
    ({"type": "array", "items": {"anyOf": [{"type": "string"}, {"not": {"type": "null"}}]}}, "`not`"),
    ({"$defs": {"x": {"not": {}}}, "type": "object"}, "#/$defs/x"),
]

FINE = [
    {},
    True,
    {"type": "object", "properties": {"not": {"type": "string"}}, "required": ["not"]},  # a property named not
    {"allOf": [{"type": "number"}, {"type": "integer"}]},
    {"type": "integer", "enum": [1.0, 2]},
    {"type": ["string", "null"], "const": None},
    {"type": "object", "properties": {"a": False}},  # an optional property that can never appear
    {"anyOf": [False, {"type": "string"}]},
    {"type": "array", "items": {"enum": []}},  # only the empty array
    {"type": "boolean", "enum": [True]},
    {"type": "integer", "minimum": 2, "maximum": 2},
]


@pytest.mark.parametrize("schema,why", UNSATISFIABLE)
def test_a_schema_no_output_can_match_is_found(schema, why):
    problem = schema_problem(schema)
    assert problem is not None and why in problem, problem
    with pytest.raises(RequestRejected, match="cannot be used for structured output") as err:
        GuidedSpec("json_schema", schema=schema).validate()
    assert err.value.status == 400


@pytest.mark.parametrize("schema", FINE)
def test_satisfiable_schemas_pass(schema):
    assert schema_problem(schema) is None


def test_tool_parameters_are_checked_too():
    tools = ({"type": "function", "function": {"name": "f", "parameters": {"type": "object", "not": {}}}},)
    with pytest.raises(RequestRejected, match="parameters of tool 'f'"):
        GuidedSpec("tool_call", tools=tools, mode="required").validate()


def test_a_schema_nested_too_deeply_is_refused():
    schema: dict = {"type": "string"}
    for _ in range(100):
        schema = {"type": "array", "items": schema, "minItems": 1}
    assert "nested more than" in schema_problem(schema)

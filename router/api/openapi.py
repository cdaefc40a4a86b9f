"""The router's OpenAPI document (GET /openapi.json, rendered at /docs), built from its real request models.

The routes are plain Starlette routes whose handlers parse their bodies themselves (api/protocol.py), so
FastAPI cannot derive a schema from their signatures: `openapi_document` describes each route of the table
it is given, with the pydantic model that really validates its body (JSON Schema 2020-12, as OpenAPI 3.1
takes it) and the error body every API answers with.
"""

from __future__ import annotations

from typing import Callable, Sequence

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

REF = "#/components/schemas/{model}"
ERROR = {"description": "An error in the API's own format (OpenAI: {error: {message, type, param, code}}; "
                        "Anthropic: {type: error, error: {type, message}})",
         "content": {"application/json": {"schema": {"type": "object"}}}}
STREAM_OR_JSON = {"application/json": {"schema": {"type": "object"}},
                  "text/event-stream": {"schema": {"type": "string", "description": "server-sent events"}}}


def openapi_document(title: str, version: str, routes: Sequence[tuple[str, str, Callable]],
                     bodies: dict[str, type[BaseModel]]) -> dict:
    """OpenAPI 3.1 for `routes` ((path, method, handler); the handler's docstring gives the summary), with
    `bodies[path]` as the request body of a path that takes one."""
    models = [(model, "validation") for model in bodies.values()]
    refs, components = models_json_schema(models, ref_template=REF)
    paths: dict[str, dict] = {}
    for path, method, handler in routes:
        operation = {"summary": (handler.__doc__ or path).strip().splitlines()[0],
                     "operationId": handler.__name__,
                     "responses": {"200": {"description": "OK", "content": STREAM_OR_JSON}, "default": ERROR}}
        if path in bodies:
            schema = refs[(bodies[path], "validation")]
            operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema}}}
        paths.setdefault(path, {})[method.lower()] = operation
    return {"openapi": "3.1.0", "info": {"title": title, "version": version}, "paths": paths,
            "components": {"schemas": components.get("$defs", {})}}

"""The OpenAPI spec documents every endpoint, and every request schema carries an example."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient


def _resolve(spec: dict[str, Any], schema: dict[str, Any]) -> list[dict[str, Any]]:
    """The component schemas a request body refers to (through refs and unions)."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[1]
        return [spec["components"]["schemas"][name]]
    found: list[dict[str, Any]] = []
    for key in ("oneOf", "anyOf"):
        for item in schema.get(key, []):
            found += _resolve(spec, item)
    return found


def test_every_request_body_has_an_example(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    bodies = 0
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            if "requestBody" not in operation:
                continue
            bodies += 1
            schema = operation["requestBody"]["content"]["application/json"]["schema"]
            resolved = _resolve(spec, schema)
            assert resolved, (method, path)
            for component in resolved:
                assert component.get("examples"), (method, path, component.get("title"))
    assert bodies == 3


def test_paths_and_security(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert set(spec["paths"]) == {
        "/healthz",
        "/readyz",
        "/v1/feedback",
        "/v1/feedback/batch",
        "/v1/evaluations",
        "/v1/signals",
    }
    assert "HTTPBearer" in spec["components"]["securitySchemes"]
    assert spec["paths"]["/v1/feedback"]["post"]["security"] == [{"HTTPBearer": []}]

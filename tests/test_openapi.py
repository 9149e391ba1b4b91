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
    assert bodies == 7


def test_paths_and_security(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert set(spec["paths"]) == {
        "/healthz",
        "/readyz",
        "/v1/feedback",
        "/v1/feedback/batch",
        "/v1/evaluations",
        "/v1/signals",
        "/v1/review/items",
        "/v1/review/items/{item_id}",
        "/v1/review/claim",
        "/v1/review/items/{item_id}/release",
        "/v1/review/items/{item_id}/approve",
        "/v1/review/items/{item_id}/reject",
        "/v1/review/clusters/{cluster_id}/decide",
    }
    assert "HTTPBearer" in spec["components"]["securitySchemes"]
    assert spec["paths"]["/v1/feedback"]["post"]["security"] == [{"HTTPBearer": []}]
    assert spec["paths"]["/v1/review/claim"]["post"]["security"] == [{"HTTPBearer": []}]

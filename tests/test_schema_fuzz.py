"""Schemathesis over the OpenAPI spec, against a live API process (admin key): no 5xx, no
status code, header, content type or body the spec does not describe, schema-invalid
requests refused, schema-valid ones accepted."""

from __future__ import annotations

import json
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from flywheel.api.app import create_app
from flywheel.settings import Settings
from tests.conftest import KeyFactory
from tests.helpers import ApiProcess, auth

# The spec as the app builds it (no database needed); the live process serves the same.
SPEC = create_app(Settings(_env_file=None)).openapi()
OPERATIONS = [f"{method.upper()} {path}" for path, item in SPEC["paths"].items() for method in item]


def _refused_for_a_reason_the_spec_cannot_state(case: Any) -> bool:
    """An opaque cursor the API did not hand out (400); NUL inside the free-form JSON of an
    evaluation sample's ``spec``, a sample id twice in a run, a pairwise event whose two
    images are one (422): JSON Schema cannot compare values. These refusals are tested in
    test_bad_input.py."""
    if case.operation.path == "/v1/signals":
        return bool(case.query and "cursor" in case.query)
    body = case.body if isinstance(case.body, dict) else {}
    chosen, rejected = body.get("chosen"), body.get("rejected")
    if (
        isinstance(chosen, dict)
        and isinstance(rejected, dict)
        and chosen.get("uri") == rejected.get("uri")
    ):
        return True
    if case.operation.path == "/v1/evaluations" and isinstance(case.body, dict):
        samples = case.body.get("samples")
        if isinstance(samples, list):
            ids = [s.get("sample_id") for s in samples if isinstance(s, dict)]
            if len(ids) != len(set(map(str, ids))):
                return True
    return "\\u0000" in json.dumps(case.body, default=str)


# Schemathesis draws some values with the `random` module inside strategies, which
# Hypothesis deprecates (a warning, an error here); the draws are still reproducible.
@pytest.mark.filterwarnings(
    "ignore:Do not use the `random` module inside strategies"
    ":hypothesis.errors.HypothesisDeprecationWarning"
)
@pytest.mark.parametrize("label", OPERATIONS)
def test_operation_conforms(label: str, live_api: ApiProcess, make_key: KeyFactory) -> None:
    method, path = label.split(" ", 1)
    operation = schemathesis.openapi.from_dict(SPEC)[path][method]
    headers = auth(make_key("admin"))

    @given(case=operation.as_strategy())
    # derandomize: the same cases on every run, so CI is reproducible (what a random run
    # finds locally is fixed, then stays covered by the example it found).
    @settings(
        max_examples=40,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
        derandomize=True,
    )
    def check(case: Any) -> None:
        excluded = (
            [positive_data_acceptance] if _refused_for_a_reason_the_spec_cannot_state(case) else []
        )
        case.call_and_validate(
            base_url=live_api.base_url, headers=headers, excluded_checks=excluded
        )

    check()

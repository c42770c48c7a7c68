"""`GET /openapi.json`: a valid OpenAPI 3.1 document of every route, from the models that
validate the requests, that cannot drift from the routes."""

from __future__ import annotations

import json

import pytest
from flask import Flask
from openapi_spec_validator import validate
from pydantic import BaseModel

from app.api import schemas
from app.openapi import (
    UNDOCUMENTED_ENDPOINTS,
    UndocumentedRoute,
    build_document,
    openapi_path,
    operations,
    routed_operations,
)


@pytest.fixture
def document(client) -> dict:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    return response.get_json()


def test_the_document_is_valid_openapi_3_1(document):
    assert document["openapi"].startswith("3.1.")
    validate(document)  # openapi-spec-validator: raises on any violation


def test_every_route_has_an_operation_and_every_operation_a_route(app, document):
    """Iterates app.url_map: a new route without an entry in app/openapi.py, or an entry
    left behind by a removed route, fails here."""
    routed = {(endpoint, method) for endpoint, method, _ in routed_operations(app)}
    table = operations()
    assert {endpoint for endpoint, _ in routed} == set(table)
    documented = {
        (path, method.upper()) for path, item in document["paths"].items() for method in item
    }
    from_url_map = {
        (openapi_path(rule.rule), method)
        for rule in app.url_map.iter_rules()
        if rule.endpoint not in UNDOCUMENTED_ENDPOINTS
        for method in rule.methods - {"HEAD", "OPTIONS"}
    }
    assert documented == from_url_map
    assert ("/openapi.json", "GET") in documented
    assert ("/v1/admin/users/{user_id}", "PUT") in documented
    assert ("/v1/stream", "GET") in documented


def test_a_route_without_an_operation_stops_the_document():
    bare = Flask(__name__)

    @bare.get("/v1/undocumented")
    def undocumented() -> str:
        return ""

    with pytest.raises(UndocumentedRoute, match="GET /v1/undocumented"):
        build_document(bare)


def _resolve(document: dict, schema: dict) -> dict:
    ref = schema.get("$ref")
    if ref:
        return document["components"]["schemas"][ref.rsplit("/", 1)[1]]
    return schema


def test_request_bodies_are_the_validating_models(document):
    """The very classes parse_body validates with, each as its own model_json_schema
    says (refs aside)."""
    by_id = {
        operation["operationId"]: operation
        for item in document["paths"].values()
        for operation in item.values()
    }
    checked = 0
    for endpoint, op in operations().items():
        if op.body is None:
            continue
        operation = by_id[endpoint.replace(".", "_")]
        schema = operation["requestBody"]["content"]["application/json"]["schema"]
        ours = _resolve(document, schema)
        theirs = op.body.model_json_schema(ref_template="#/components/schemas/{model}")
        theirs.pop("$defs", None)
        assert ours == theirs, endpoint
        assert operation["requestBody"]["required"] is op.body_required
        checked += 1
    assert checked >= 10


def test_bad_input_is_a_400_never_a_422(document):
    text = json.dumps(document)
    assert '"422"' not in text
    send = document["paths"]["/v1/conversations/{conversation_id}/messages"]["post"]
    codes = send["responses"]["400"]["content"]["application/json"]["schema"]["properties"]
    assert "invalid_request" in codes["error"]["properties"]["code"]["enum"]


def test_every_error_response_has_the_error_shape_and_its_codes(document):
    assert document["components"]["schemas"]["Error"]["required"] == ["error"]
    detail = document["components"]["schemas"]["ErrorDetail"]
    assert set(detail["required"]) == {"code", "message"}
    for path, item in document["paths"].items():
        for method, operation in item.items():
            for status, response in operation["responses"].items():
                if int(status) < 400 or path.startswith("/health"):
                    continue
                schema = response["content"]["application/json"]["schema"]
                assert schema["allOf"] == [{"$ref": "#/components/schemas/Error"}]
                codes = schema["properties"]["error"]["properties"]["code"]["enum"]
                assert codes, (method, path, status)
                for code in codes:
                    assert f"`{code}`" in response["description"]


def test_auth_schemes(document):
    schemes = document["components"]["securitySchemes"]
    assert schemes["userToken"] == schemes["userToken"] | {
        "scheme": "bearer",
        "bearerFormat": "JWT",
    }
    assert schemes["serviceToken"]["scheme"] == "bearer"
    for path, item in document["paths"].items():
        for operation in item.values():
            if path.startswith("/v1/admin/"):
                assert operation["security"] == [{"serviceToken": []}]
                assert "invalid_service_token" in json.dumps(operation["responses"]["401"])
            elif path == "/v1/stream":
                assert {"userToken": []} in operation["security"]
            elif path.startswith("/v1/"):
                assert operation["security"] == [{"userToken": []}]
                assert "unknown_user" in json.dumps(operation["responses"]["401"])
                assert "429" in operation["responses"]


def test_the_stream_describes_its_frames(document):
    stream = document["paths"]["/v1/stream"]["get"]
    for frame in (
        "message.created",
        "message.deleted",
        "message.rejected",
        "conversation.read",
        "broadcast.created",
        "typing",
        "resync.required",
        "4001",
    ):
        assert frame in stream["description"]
    assert [p["name"] for p in stream["parameters"]] == ["last_event_id"]


def test_response_models_forbid_undocumented_fields():
    """So that the fuzz test's schema check fails on a field the document does not name."""
    for model in vars(schemas).values():
        if isinstance(model, type) and issubclass(model, BaseModel) and model is not BaseModel:
            assert model.model_config.get("extra") == "forbid", model.__name__


def test_the_document_is_public_and_cacheable(client):
    response = client.get("/openapi.json")
    assert "public" in response.headers["Cache-Control"]
    assert response.get_json() == client.get("/openapi.json").get_json()

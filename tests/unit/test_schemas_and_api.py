"""Checked-in JSON Schemas match the models; the public API is what we mean it to be."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import choreo
from agents.events import ALL_EVENTS
from choreo import schema

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"


def test_checked_in_schemas_match_the_models() -> None:
    stale = schema.drift(SCHEMAS, ALL_EVENTS)
    assert stale == [], f"schemas/ drifted from the models: {stale}; run `choreo schemas`"


def test_drift_is_detected(tmp_path: Path) -> None:
    schema.write(tmp_path, ALL_EVENTS)
    assert schema.drift(tmp_path, ALL_EVENTS) == []
    path = tmp_path / "envelope.v1.json"
    data = json.loads(path.read_text())
    data["properties"]["ttl_ms"]["description"] = "changed"
    path.write_text(json.dumps(data))
    (tmp_path / "order.placed.json").unlink()
    assert sorted(schema.drift(tmp_path, ALL_EVENTS)) == ["envelope.v1.json", "order.placed.json"]


def test_envelope_schema_states_the_wire_contract() -> None:
    envelope = json.loads((SCHEMAS / "envelope.v1.json").read_text())
    assert set(envelope["required"]) == {"id", "type", "source", "issued_at", "trace_id", "payload"}
    props = envelope["properties"]
    assert props["type"]["pattern"] == r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$"
    assert props["trace_id"]["pattern"] == r"^[0-9a-f]{32}$"
    assert props["id"]["maxLength"] == 128
    assert envelope.get("additionalProperties", True) is True  # unknown fields are kept


def test_every_example_event_has_a_schema_with_order_id() -> None:
    for cls in ALL_EVENTS:
        data = json.loads((SCHEMAS / f"{cls.event_type()}.json").read_text())
        assert "order_id" in data["required"], cls.event_type()


def test_public_api_is_pinned_and_sorted() -> None:
    assert choreo.__all__ == sorted(choreo.__all__)
    assert set(choreo.__all__) == {
        "Agent",
        "AgentEnv",
        "AgentRuntime",
        "AgentStats",
        "ChoreoError",
        "ConfigError",
        "Context",
        "Emitted",
        "Envelope",
        "Event",
        "EventExpired",
        "Failure",
        "HandlerError",
        "HandlerSignal",
        "HeadersNotSendable",
        "Keyring",
        "MalformedMessage",
        "MessageFault",
        "Naming",
        "PublishNotConfirmed",
        "Publisher",
        "Reject",
        "Retry",
        "RetryPolicy",
        "SchemaInvalid",
        "Settings",
        "SignatureInvalid",
        "SyncPublisher",
        "TopologyError",
        "TransportError",
        "UnknownEventType",
        "Worker",
    }
    for name in choreo.__all__:
        assert hasattr(choreo, name), name


def test_the_documented_submodules_are_reachable_after_a_plain_import() -> None:
    """The docs write ``import choreo`` then ``choreo.testing.call(...)``; in a fresh interpreter,
    where nothing else imported them first."""
    import subprocess
    import sys

    code = "import choreo; print(choreo.testing.call.__name__, choreo.outbox.write_sqlite.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["call", "write_sqlite"]
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        choreo.nothing  # noqa: B018


def test_an_http_port_out_of_range_is_a_configuration_error() -> None:
    with pytest.raises(choreo.ConfigError, match="CHOREO_HTTP_PORT must be <= 65535, got 70000"):
        choreo.Settings.from_env({"CHOREO_HTTP_PORT": "70000", "CHOREO_SIGNING_KEYS": "k1=s"})
    assert choreo.Settings.from_env({"CHOREO_HTTP_PORT": "65535", "CHOREO_SIGNING_KEYS": "k1=s"}).http_port == 65535

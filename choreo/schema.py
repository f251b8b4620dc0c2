"""JSON Schemas of the envelope and of event payloads, as checked in under ``schemas/``."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .envelope import Envelope
from .events import Event

__all__ = ["envelope_schema", "event_schema", "render", "schema_files"]

ENVELOPE_FILE = "envelope.v1.json"


def envelope_schema() -> dict[str, Any]:
    return Envelope.model_json_schema(mode="validation")


def event_schema(cls: type[Event]) -> dict[str, Any]:
    schema = cls.model_json_schema(mode="validation")
    schema["title"] = cls.event_type()
    schema["description"] = (cls.__doc__ or "").strip() or f"Payload of {cls.event_type()} events."
    return schema


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def schema_files(events: Iterable[type[Event]]) -> dict[str, str]:
    """File name -> content for the envelope and each event (``<type>.json``)."""
    files = {ENVELOPE_FILE: render(envelope_schema())}
    for cls in events:
        files[f"{cls.event_type()}.json"] = render(event_schema(cls))
    return files


def write(directory: Path, events: Iterable[type[Event]]) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, content in schema_files(events).items():
        path = directory / name
        path.write_text(content)
        written.append(path)
    return written


def drift(directory: Path, events: Iterable[type[Event]]) -> list[str]:
    """Names of schema files that are missing or differ from what the models generate."""
    return [
        name
        for name, content in schema_files(events).items()
        if not (directory / name).is_file() or (directory / name).read_text() != content
    ]

"""Every example of docs/publishing.md publishes an ``order.placed`` the example saga accepts.

The examples' bodies are taken out of the page (and out of docs/examples/publish.js, which the
Node section shows) and checked as a consumer would: a v1 envelope with the wire format's
field names, and a payload valid for the saga's ``OrderPlaced`` (``schemas/order.placed.json``).
The Java and Go bodies are code, so the bits they compute at run time (ids, clock) are
replaced by sample values: an expression the test does not know fails it, saying which.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from agents.events import OrderPlaced
from choreo.envelope import Envelope, parse_envelope

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs/publishing.md").read_text()
NODE_EXAMPLE = (ROOT / "docs/examples/publish.js").read_text()
ORDER_PLACED_SCHEMA = json.loads((ROOT / "schemas/order.placed.json").read_text())

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
ISSUED_AT = "2026-11-20T10:00:00.123Z"
# What the Java and Go examples compute at run time, by the expression's text.
SAMPLES: dict[str, str] = {
    "id": "e-1",
    "traceId": TRACE_ID,
    "traceID": TRACE_ID,
    "issuedAt": ISSUED_AT,
    'time.Now().UTC().Format("2006-01-02T15:04:05.000Z07:00")': ISSUED_AT,
}
WIRE_FIELDS = set(Envelope.model_fields)  # the fields of docs/wire-format.md's body table
SIGNATURE_HEADERS = ('"x-choreo-alg"', '"hmac-sha256"', '"x-choreo-kid"', '"x-choreo-sig"')


def code_block(lang: str) -> str:
    blocks = re.findall(rf"```{lang}\n(.*?)```", DOC, re.DOTALL)
    assert len(blocks) >= 1, f"no {lang} example in docs/publishing.md"
    return "\n".join(blocks)


def sample(expression: str) -> str:
    assert expression in SAMPLES, f"the example computes {expression!r}: give the test a sample value for it"
    return SAMPLES[expression]


# Java: a body built by concatenating string literals and String variables ---------------------
_JAVA_TOKEN = re.compile(r'\s+|//[^\n]*|(?P<str>"(?:\\.|[^"\\])*")|(?P<name>[A-Za-z_]\w*)|(?P<op>[+;])')


def java_string(block: str, name: str) -> str:
    """The value of ``String name = "..." + other + ...;`` in ``block``; the run-time ones
    (``id``, ``issuedAt``, ``traceId``) are samples."""
    if name in SAMPLES:
        return SAMPLES[name]
    match = re.search(rf"\bString {name} = ", block)
    assert match is not None, f"the Java example uses {name!r} without declaring it"
    value, pos = "", match.end()
    while (token := _JAVA_TOKEN.match(block, pos)) is not None and token.group("op") != ";":
        pos = token.end()
        if token.group("str"):
            literal = token.group("str")[1:-1]
            assert re.fullmatch(r'(?:[^\\]|\\["\\])*', literal), f"unexpected escape in {literal!r}"
            value += re.sub(r"\\(.)", r"\1", literal)
        elif token.group("name"):
            value += java_string(block, token.group("name"))
    assert token is not None, f"cannot read the Java expression of {name} at {block[pos : pos + 40]!r}"
    return value


# Go and JavaScript: composite / object literals -------------------------------------------------
_LITERAL_TOKEN = re.compile(
    r"""\s+|//[^\n]*
    |(?P<type>(?:\[\])?map\[string\](?:any|interface\{\})|\[\]any)
    |(?P<str>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*')
    |(?P<num>-?\d+(?:\.\d+)?(?![\w.]))
    |(?P<punct>[{}\[\]:,])
    |(?P<other>[^\s{}\[\]:,"']+)""",
    re.VERBOSE,
)


def unquote(literal: str) -> str:
    """A Go or JavaScript string literal's value (plain text, no escapes but ``\\"``)."""
    if literal.startswith("'"):
        literal = '"' + literal[1:-1].replace('"', '\\"') + '"'
    value: str = json.loads(literal)
    return value


class LiteralReader:
    """Reads a Go composite literal of maps and slices, or a JavaScript object literal, into
    JSON values; any other expression (a variable, a call) is looked up in :data:`SAMPLES`."""

    def __init__(self, text: str) -> None:
        self.tokens: list[tuple[str, str, int, int]] = []
        pos = 0
        while pos < len(text):
            token = _LITERAL_TOKEN.match(text, pos)
            assert token is not None, f"cannot read {text[pos : pos + 40]!r}"
            if token.lastgroup is not None:
                self.tokens.append((token.lastgroup, token.group(), token.start(), token.end()))
            pos = token.end()
        self.text = text
        self.i = 0

    def peek(self) -> tuple[str, str]:
        kind, value, _, _ = self.tokens[self.i]
        return kind, value

    def take(self, expected: str | None = None) -> str:
        value = self.tokens[self.i][1]
        assert expected is None or value == expected, f"expected {expected!r}, found {value!r}"
        self.i += 1
        return value

    def value(self, go_type: str | None = None) -> Any:
        kind, token = self.peek()
        if kind == "type":
            go_type = self.take()
            kind, token = self.peek()
        if token == "{":
            if go_type is not None and go_type.startswith("[]"):
                return self.items("}", element_type=go_type[2:])
            return self.members()
        if token == "[":
            return self.items("]", element_type=None)
        if kind == "str":
            return unquote(self.take())
        if kind == "num":
            return json.loads(self.take())
        return sample(self.expression())

    def expression(self) -> str:
        """The source text of a non-literal value, up to the ``,`` or bracket that ends it."""
        start = self.tokens[self.i][2]
        depth = 0
        end = start
        while True:
            kind, token, _, token_end = self.tokens[self.i]
            if depth == 0 and kind == "punct" and token in ",}]":
                return self.text[start:end]
            depth += token.count("(") - token.count(")")
            end = token_end
            self.i += 1

    def members(self) -> dict[str, Any]:
        self.take("{")
        result: dict[str, Any] = {}
        while self.peek()[1] != "}":
            kind, key = self.peek()
            self.take()
            if kind == "str":
                key = unquote(key)
            self.take(":")
            result[key] = self.value()
            if self.peek()[1] == ",":
                self.take()
        self.take("}")
        return result

    def items(self, close: str, *, element_type: str | None) -> list[Any]:
        self.take()  # { of a Go slice, [ of a JavaScript array
        result: list[Any] = []
        while self.peek()[1] != close:
            result.append(self.value(element_type))
            if self.peek()[1] == ",":
                self.take()
        self.take(close)
        return result


def balanced(text: str, start: int) -> str:
    """``text`` from ``start`` to the ``}`` closing the first ``{`` after it (no braces in strings)."""
    depth = 0
    for pos in range(text.index("{", start), len(text)):
        depth += {"{": 1, "}": -1}.get(text[pos], 0)
        if depth == 0:
            return text[start : pos + 1]
    raise AssertionError(f"unbalanced braces after {text[start : start + 40]!r}")


# The examples -----------------------------------------------------------------------------------
def shell_body() -> dict[str, Any]:
    match = re.search(r"^body='(.*)'$", code_block("sh"), re.MULTILINE)
    assert match is not None, "no body='...' in the shell example"
    body: dict[str, Any] = json.loads(match.group(1))
    return body


def cli_payload() -> dict[str, Any]:
    match = re.search(r"choreo publish order\.placed '(.*?)'", code_block("sh"), re.DOTALL)
    assert match is not None, "no `choreo publish order.placed '...'` in the shell examples"
    payload: dict[str, Any] = json.loads(match.group(1))
    return payload


def java_body() -> dict[str, Any]:
    block = code_block("java")
    assert all(header in block for header in SIGNATURE_HEADERS), "the Java example must send the signature headers"
    body: dict[str, Any] = json.loads(java_string(block, "body"))
    return body


def go_body() -> dict[str, Any]:
    block = code_block("go")
    assert all(header in block for header in SIGNATURE_HEADERS), "the Go example must send the signature headers"
    start = block.index("envelope := ") + len("envelope := ")
    body: dict[str, Any] = LiteralReader(balanced(block, start)).value()
    return body


def node_payload() -> dict[str, Any]:
    assert "docs/examples/publish.js" in DOC or "(examples/publish.js)" in DOC
    start = NODE_EXAMPLE.index("payload:") + len("payload:")
    payload: dict[str, Any] = LiteralReader(balanced(NODE_EXAMPLE, start)).value()
    return payload


BODIES = {"shell": shell_body, "java": java_body, "go": go_body}
PAYLOADS = {"choreo publish": cli_payload, "node": node_payload}


@pytest.mark.parametrize("language", sorted(BODIES))
def test_example_body_is_a_wire_format_envelope_of_a_valid_order_placed(language: str) -> None:
    body = BODIES[language]()
    assert set(body) <= WIRE_FIELDS, f"fields not in the wire format: {set(body) - WIRE_FIELDS}"
    envelope = parse_envelope(json.dumps(body).encode())
    assert envelope.type == "order.placed"
    OrderPlaced.from_payload(envelope.payload)  # as the inventory agent validates it
    assert set(ORDER_PLACED_SCHEMA["required"]) <= set(envelope.payload)


@pytest.mark.parametrize("example", sorted(PAYLOADS))
def test_example_payload_is_a_valid_order_placed(example: str) -> None:
    payload = PAYLOADS[example]()
    OrderPlaced.from_payload(payload)
    assert set(ORDER_PLACED_SCHEMA["required"]) <= set(payload)


def test_the_examples_carry_the_same_order() -> None:
    shell = shell_body()["payload"]
    assert java_body()["payload"] == shell
    assert go_body()["payload"] == shell
    assert cli_payload() == shell
    assert {**node_payload(), "order_id": shell["order_id"]} == shell  # its own id, for its test

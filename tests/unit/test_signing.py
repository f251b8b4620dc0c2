"""Signatures over the exact body bytes (wire format v1, "Signature")."""

from __future__ import annotations

import hashlib
import hmac
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from choreo import codec
from choreo.envelope import Envelope, parse_envelope
from choreo.errors import ConfigError, SignatureInvalid
from choreo.signing import (
    ALG_HEADER,
    ED25519,
    HMAC_SHA256,
    KID_HEADER,
    SIG_HEADER,
    Ed25519Signer,
    Ed25519Verifier,
    HmacKey,
    Keyring,
    ed25519_pem_pair,
    generate_ed25519_keypair,
)

# The example body of docs/wire-format.md, byte for byte as a shell producer would send it.
SPEC_BODY = (
    b'{"id":"e-1","type":"order.placed","source":"shop","issued_at":"2026-11-20T10:00:00Z",'
    b'"trace_id":"4bf92f3577b34da6a3ce929d0e0e4736","payload":{"order_id":"o-1"}}'
)


def make_envelope() -> Envelope:
    return Envelope.model_validate(
        {
            "id": "0190f1a2-7b3c-7d4e-8f50-123456789abc",
            "type": "order.placed",
            "source": "shop",
            "issued_at": datetime(2026, 11, 20, 10, 0, 0, 123000, tzinfo=UTC),
            "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
            "causation_id": "cause-1",
            "correlation_id": "saga-1",
            "dedup_key": "order-o-1",
            "ttl_ms": 60000,
            "payload": {"order_id": "o-1", "lines": [{"sku": "A", "qty": 2}], "total": "12.50"},
            "x_future": {"hint": True},
        }
    )


@pytest.fixture
def body() -> bytes:
    return make_envelope().encode()


def hmac_keyring(kid: str = "k1", secret: str = "s3cret") -> Keyring:
    return Keyring.hmac((kid, secret))


def ed25519_keyring(kid: str = "p1") -> Keyring:
    signer, _ = generate_ed25519_keypair(kid)
    return Keyring(signer)


KEYRING_FACTORIES = {HMAC_SHA256: hmac_keyring, ED25519: ed25519_keyring}


@pytest.fixture(params=[HMAC_SHA256, ED25519])
def keyring(request: pytest.FixtureRequest) -> Keyring:
    factory = KEYRING_FACTORIES[request.param]
    return factory()


def with_header(headers: dict[str, str], name: str, value: str) -> dict[str, str]:
    return {**headers, name: value}


# round trips ---------------------------------------------------------------------------------


def test_hmac_sign_verify_round_trip(body: bytes) -> None:
    keyring = Keyring.hmac(("k1", "s3cret"))
    headers = keyring.sign(body)
    assert headers[ALG_HEADER] == HMAC_SHA256
    assert headers[KID_HEADER] == "k1"
    assert len(headers[SIG_HEADER]) == 64
    assert headers[SIG_HEADER] == headers[SIG_HEADER].lower()
    keyring.verify(body, headers)
    # A separate consumer holding the same shared secret verifies it too.
    Keyring(None, [HmacKey.from_text("k1", "s3cret")]).verify(body, headers)


def test_hmac_key_sign_and_verify_directly(body: bytes) -> None:
    key = HmacKey.from_text("k1", "s3cret")
    assert key.alg == HMAC_SHA256
    assert key.secret == b"s3cret"
    signature = bytes.fromhex(key.sign(body))
    assert key.verify(body, signature)
    assert not key.verify(body + b" ", signature)
    assert not HmacKey.from_text("k1", "other").verify(body, signature)


def test_ed25519_sign_verify_round_trip(body: bytes) -> None:
    signer, verifier = generate_ed25519_keypair("p1")
    assert (signer.alg, signer.kid) == (ED25519, "p1")
    assert (verifier.alg, verifier.kid) == (ED25519, "p1")
    headers = Keyring(signer).sign(body)
    assert headers[ALG_HEADER] == ED25519
    assert headers[KID_HEADER] == "p1"
    assert len(headers[SIG_HEADER]) == 128  # 64-byte Ed25519 signature
    assert headers[SIG_HEADER] == headers[SIG_HEADER].lower()
    # The consumer holds only the public key.
    Keyring(None, [verifier]).verify(body, headers)
    assert verifier.verify(body, bytes.fromhex(headers[SIG_HEADER]))
    assert not verifier.verify(body + b"x", bytes.fromhex(headers[SIG_HEADER]))


def test_ed25519_signature_from_another_key_pair_is_rejected(body: bytes) -> None:
    signer, _ = generate_ed25519_keypair("p1")
    _, other_verifier = generate_ed25519_keypair("p1")
    headers = Keyring(signer).sign(body)
    with pytest.raises(SignatureInvalid, match="does not match"):
        Keyring(None, [other_verifier]).verify(body, headers)


def test_signer_verifier_matches_its_public_key(body: bytes) -> None:
    signer, verifier = generate_ed25519_keypair("p1")
    derived = signer.verifier()
    signature = bytes.fromhex(signer.sign(body))
    assert derived.verify(body, signature)
    assert verifier.verify(body, signature)


def test_verify_accepts_bytes_header_values(keyring: Keyring, body: bytes) -> None:
    """AMQP libraries hand header values back as bytes."""
    headers = {name: value.encode("ascii") for name, value in keyring.sign(body).items()}
    keyring.verify(body, headers)


def test_non_ascii_bytes_header_is_rejected(body: bytes) -> None:
    keyring = hmac_keyring()
    headers: dict[str, object] = dict(keyring.sign(body))
    headers[KID_HEADER] = b"\xffk1"
    with pytest.raises(SignatureInvalid):
        keyring.verify(body, headers)


def test_sign_without_signing_key_raises_config_error(body: bytes) -> None:
    with pytest.raises(ConfigError, match="no signing key"):
        Keyring(None, [HmacKey.from_text("k1", "s")]).sign(body)


def test_keyring_kids_lists_every_verification_key() -> None:
    signer, verifier = generate_ed25519_keypair("p1")
    keyring = Keyring(HmacKey.from_text("k1", "a"), [HmacKey.from_text("k0", "b"), verifier])
    assert sorted(keyring.kids) == ["ed25519:p1", "hmac-sha256:k0", "hmac-sha256:k1"]
    assert signer.kid == "p1"


# tampering -----------------------------------------------------------------------------------


def test_every_single_byte_change_of_the_body_is_rejected(keyring: Keyring, body: bytes) -> None:
    headers = keyring.sign(body)
    keyring.verify(body, headers)
    assert len(body) > 200
    for position in range(len(body)):
        for mask in (0x01, 0x80):
            tampered = bytearray(body)
            tampered[position] ^= mask
            with pytest.raises(SignatureInvalid, match="does not match"):
                keyring.verify(bytes(tampered), headers)


def test_truncated_or_extended_body_is_rejected(keyring: Keyring, body: bytes) -> None:
    headers = keyring.sign(body)
    for tampered in (body[:-1], body[1:], body + b" ", b" " + body, body + b"\n", b""):
        with pytest.raises(SignatureInvalid):
            keyring.verify(tampered, headers)


CHANGED_FIELDS: list[tuple[str, Any]] = [
    ("id", "0190f1a2-7b3c-7d4e-8f50-123456789abd"),
    ("type", "order.cancelled"),
    ("source", "shop2"),
    ("issued_at", "2026-11-20T10:00:00.124Z"),
    ("trace_id", "4bf92f3577b34da6a3ce929d0e0e4737"),
    ("causation_id", None),
    ("correlation_id", "saga-2"),
    ("dedup_key", None),
    ("ttl_ms", 60001),
    ("payload", {"order_id": "o-2", "lines": [{"sku": "A", "qty": 2}], "total": "12.50"}),
    ("payload", {"order_id": "o-1", "lines": [{"sku": "A", "qty": 3}], "total": "12.50"}),
    ("x_future", {"hint": False}),
    ("x_added", 1),
]


@pytest.mark.parametrize(("field", "value"), CHANGED_FIELDS)
def test_changing_any_single_envelope_field_is_rejected(keyring: Keyring, field: str, value: Any) -> None:
    original = make_envelope()
    body = original.encode()
    headers = keyring.sign(body)
    data = original.to_wire()
    assert data.get(field) != value
    data[field] = value
    changed = codec.dumps(data)
    # The changed body is still a valid envelope: only the signature can catch the change.
    assert parse_envelope(changed) != original
    with pytest.raises(SignatureInvalid, match="does not match"):
        keyring.verify(changed, headers)


def test_signature_is_over_exact_bytes_not_parsed_content(keyring: Keyring) -> None:
    """Re-serialising the same JSON differently (whitespace) must not verify: no canonicalisation."""
    headers = keyring.sign(SPEC_BODY)
    reformatted = SPEC_BODY.replace(b'","', b'", "')
    assert codec.loads_object(reformatted) == codec.loads_object(SPEC_BODY)
    with pytest.raises(SignatureInvalid):
        keyring.verify(reformatted, headers)


# keys and algorithms -------------------------------------------------------------------------


def test_unknown_kid_is_rejected(keyring: Keyring, body: bytes) -> None:
    headers = with_header(keyring.sign(body), KID_HEADER, "nobody")
    with pytest.raises(SignatureInvalid, match="unknown key id 'nobody'"):
        keyring.verify(body, headers)


def test_same_kid_with_a_different_hmac_secret_is_rejected(body: bytes) -> None:
    headers = Keyring.hmac(("k1", "one")).sign(body)
    with pytest.raises(SignatureInvalid, match="does not match"):
        Keyring.hmac(("k1", "two")).verify(body, headers)


def test_hmac_signature_presented_as_ed25519_under_same_kid_is_rejected(body: bytes) -> None:
    hmac_key = HmacKey.from_text("k1", "s3cret")
    headers = Keyring(hmac_key).sign(body)
    forged = with_header(headers, ALG_HEADER, ED25519)
    # Only an HMAC key under k1: there is no ed25519 key k1.
    with pytest.raises(SignatureInvalid, match="unknown key id"):
        Keyring(hmac_key).verify(body, forged)
    # Both an HMAC key and an Ed25519 key under k1: the HMAC digest is not a valid Ed25519 signature.
    _, ed_verifier = generate_ed25519_keypair("k1")
    both = Keyring(hmac_key, [ed_verifier])
    both.verify(body, headers)
    with pytest.raises(SignatureInvalid, match="does not match"):
        both.verify(body, forged)


def test_ed25519_signature_presented_as_hmac_is_rejected(body: bytes) -> None:
    signer, verifier = generate_ed25519_keypair("k1")
    headers = Keyring(signer).sign(body)
    forged = with_header(headers, ALG_HEADER, HMAC_SHA256)
    with pytest.raises(SignatureInvalid):
        Keyring(HmacKey.from_text("k1", "s3cret"), [verifier]).verify(body, forged)


def test_alg_not_in_allowed_algs_is_rejected(body: bytes) -> None:
    key = HmacKey.from_text("k1", "s3cret")
    headers = Keyring(key).sign(body)
    Keyring(key).verify(body, headers)
    with pytest.raises(SignatureInvalid, match="not allowed"):
        Keyring(key, allowed_algs=frozenset({ED25519})).verify(body, headers)


@pytest.mark.parametrize("alg", ["hmac-sha1", "HMAC-SHA256", "none", "rsa"])
def test_unknown_alg_header_is_rejected(body: bytes, alg: str) -> None:
    keyring = hmac_keyring()
    with pytest.raises(SignatureInvalid, match="not allowed"):
        keyring.verify(body, with_header(keyring.sign(body), ALG_HEADER, alg))


def test_allowed_algs_with_unknown_algorithm_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown signature algorithm"):
        Keyring(None, allowed_algs=frozenset({"hmac-md5"}))


# headers -------------------------------------------------------------------------------------


@pytest.mark.parametrize("missing", [ALG_HEADER, KID_HEADER, SIG_HEADER])
def test_each_missing_header_is_rejected(keyring: Keyring, body: bytes, missing: str) -> None:
    headers = keyring.sign(body)
    del headers[missing]
    with pytest.raises(SignatureInvalid, match="incomplete"):
        keyring.verify(body, headers)


@pytest.mark.parametrize("empty", [ALG_HEADER, KID_HEADER, SIG_HEADER])
def test_each_empty_header_is_rejected(keyring: Keyring, body: bytes, empty: str) -> None:
    with pytest.raises(SignatureInvalid):
        keyring.verify(body, with_header(keyring.sign(body), empty, ""))


@pytest.mark.parametrize("headers", [None, {}, {"content-type": "application/json"}])
def test_unsigned_message_is_rejected_by_default(body: bytes, headers: dict[str, object] | None) -> None:
    keyring = hmac_keyring()
    assert keyring.accept_unsigned is False
    with pytest.raises(SignatureInvalid, match="not signed"):
        keyring.verify(body, headers)


@pytest.mark.parametrize(
    "signature",
    [
        "zz" * 32,  # right length, not hex
        "abc",  # odd length
        "0x" + "ab" * 31,
        "gg",
    ],
)
def test_non_hex_signature_is_rejected(keyring: Keyring, body: bytes, signature: str) -> None:
    with pytest.raises(SignatureInvalid, match="not hex"):
        keyring.verify(body, with_header(keyring.sign(body), SIG_HEADER, signature))


@pytest.mark.parametrize(
    "spoil",
    [
        lambda sig: " ".join(sig[i : i + 2] for i in range(0, len(sig), 2)),
        lambda sig: sig + "\n",
        lambda sig: " " + sig,
        lambda sig: sig[:32] + "\t" + sig[32:],
    ],
    ids=["spaced-pairs", "trailing-newline", "leading-space", "tab"],
)
def test_signature_with_whitespace_is_rejected(body: bytes, spoil: Any) -> None:
    """bytes.fromhex would read each of these as the right signature: the header must be hex
    digits only."""
    keyring = hmac_keyring()
    headers = keyring.sign(body)
    spoiled = spoil(headers[SIG_HEADER])
    assert bytes.fromhex(spoiled) == bytes.fromhex(headers[SIG_HEADER])
    with pytest.raises(SignatureInvalid, match="not hex"):
        keyring.verify(body, with_header(headers, SIG_HEADER, spoiled))


def test_uppercase_hex_signature_is_accepted(body: bytes) -> None:
    keyring = hmac_keyring()
    headers = keyring.sign(body)
    keyring.verify(body, with_header(headers, SIG_HEADER, headers[SIG_HEADER].upper()))


@pytest.mark.parametrize("key_length", [1, 32, 63, 64, 65, 200])
@pytest.mark.parametrize("body_length", [0, 1, 55, 64, 453, 5000])
def test_hmac_matches_the_standard_library(key_length: int, body_length: int) -> None:
    """The pre-keyed states give RFC 2104 HMAC-SHA256, including keys longer than a block
    (hashed first) and bodies of any length."""
    secret = bytes(range(256))[:key_length] if key_length <= 256 else b""
    secret = (secret * 2)[:key_length]
    body = (b"choreo-" * 1000)[:body_length]
    key = HmacKey("k", secret)
    assert key.mac(body) == hmac.digest(secret, body, hashlib.sha256)
    assert key.sign(body) == hmac.new(secret, body, hashlib.sha256).hexdigest()
    # Copies of the keyed states: a second message is not hashed on top of the first.
    assert key.mac(body + b"x") == hmac.digest(secret, body + b"x", hashlib.sha256)
    assert key.mac(body) == hmac.digest(secret, body, hashlib.sha256)


@pytest.mark.parametrize("length", [0, 1, 31, 33, 63, 65])
def test_signature_of_wrong_length_is_rejected(keyring: Keyring, body: bytes, length: int) -> None:
    headers = keyring.sign(body)
    sig = headers[SIG_HEADER]
    wrong = (sig * 2)[: length * 2]
    with pytest.raises(SignatureInvalid):
        keyring.verify(body, with_header(headers, SIG_HEADER, wrong))


# accept_unsigned ----------------------------------------------------------------------------


def test_accept_unsigned_accepts_a_message_without_headers(body: bytes) -> None:
    keyring = Keyring.hmac(("k1", "s3cret"), accept_unsigned=True)
    keyring.verify(body, None)
    keyring.verify(body, {})
    keyring.verify(body, {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"})


def test_accept_unsigned_still_rejects_a_wrong_signature(body: bytes) -> None:
    keyring = Keyring.hmac(("k1", "s3cret"), accept_unsigned=True)
    headers = keyring.sign(body)
    wrong = with_header(headers, SIG_HEADER, "00" * 32)
    with pytest.raises(SignatureInvalid, match="does not match"):
        keyring.verify(body, wrong)
    forged = Keyring.hmac(("k1", "not-the-secret")).sign(body)
    with pytest.raises(SignatureInvalid):
        keyring.verify(body, forged)


def test_accept_unsigned_still_rejects_partial_or_unknown_headers(body: bytes) -> None:
    keyring = Keyring.hmac(("k1", "s3cret"), accept_unsigned=True)
    headers = keyring.sign(body)
    with pytest.raises(SignatureInvalid, match="incomplete"):
        keyring.verify(body, {SIG_HEADER: headers[SIG_HEADER]})
    with pytest.raises(SignatureInvalid, match="unknown key id"):
        keyring.verify(body, with_header(headers, KID_HEADER, "k9"))


def test_accept_unsigned_from_env() -> None:
    assert Keyring.from_env({"CHOREO_ACCEPT_UNSIGNED": "1"}).accept_unsigned is True
    assert Keyring.from_env({"CHOREO_ACCEPT_UNSIGNED": "true"}).accept_unsigned is True
    assert Keyring.from_env({"CHOREO_ACCEPT_UNSIGNED": "0"}).accept_unsigned is False
    assert Keyring.from_env({}).accept_unsigned is False


# rotation ------------------------------------------------------------------------------------


def test_rotation_from_env_signs_with_first_and_verifies_old(body: bytes) -> None:
    rotated = Keyring.from_env({"CHOREO_SIGNING_KEYS": "k1=new,k0=old"})
    old_producer = Keyring.from_env({"CHOREO_SIGNING_KEYS": "k0=old"})

    headers = rotated.sign(body)
    assert headers[KID_HEADER] == "k1"
    assert headers[ALG_HEADER] == HMAC_SHA256
    assert headers[SIG_HEADER] == hmac.new(b"new", body, hashlib.sha256).hexdigest()

    old_headers = old_producer.sign(body)
    assert old_headers[KID_HEADER] == "k0"
    rotated.verify(body, old_headers)
    rotated.verify(body, headers)


def test_after_rotation_a_keyring_holding_only_the_new_key_rejects_old_signatures(body: bytes) -> None:
    old_headers = Keyring.from_env({"CHOREO_SIGNING_KEYS": "k0=old"}).sign(body)
    new_only = Keyring.from_env({"CHOREO_SIGNING_KEYS": "k1=new"})
    new_only.verify(body, Keyring.from_env({"CHOREO_SIGNING_KEYS": "k1=new,k0=old"}).sign(body))
    with pytest.raises(SignatureInvalid, match="unknown key id 'k0'"):
        new_only.verify(body, old_headers)


def test_from_env_tolerates_spaces_and_keeps_equals_signs_in_secrets(body: bytes) -> None:
    keyring = Keyring.from_env({"CHOREO_SIGNING_KEYS": " k1=a=b==, k0=old "})
    headers = keyring.sign(body)
    assert headers[KID_HEADER] == "k1"
    assert headers[SIG_HEADER] == hmac.new(b"a=b==", body, hashlib.sha256).hexdigest()


def test_keyring_hmac_first_pair_signs_all_verify(body: bytes) -> None:
    keyring = Keyring.hmac(("k1", "new"), ("k0", "old"))
    assert keyring.sign(body)[KID_HEADER] == "k1"
    keyring.verify(body, Keyring.hmac(("k0", "old")).sign(body))


@pytest.mark.parametrize(
    "text",
    [
        "k1",  # no '='
        "=secret",  # no kid
        "k1=",  # no secret
        " =secret",
        "k1=new,k0",
        "k1=new,=old",
    ],
)
def test_bad_signing_keys_text_raises_config_error(text: str) -> None:
    with pytest.raises(ConfigError, match="CHOREO_SIGNING_KEYS"):
        Keyring.from_env({"CHOREO_SIGNING_KEYS": text})


def test_bad_allowed_algs_env_raises_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown signature algorithm"):
        Keyring.from_env({"CHOREO_SIGNING_KEYS": "k1=s", "CHOREO_ALLOWED_ALGS": "hmac-sha256,rsa"})


def test_allowed_algs_env_restricts_verification(body: bytes) -> None:
    keyring = Keyring.from_env({"CHOREO_SIGNING_KEYS": "k1=s", "CHOREO_ALLOWED_ALGS": " ed25519 "})
    assert keyring.allowed_algs == frozenset({ED25519})
    with pytest.raises(SignatureInvalid, match="not allowed"):
        keyring.verify(body, keyring.sign(body))


def test_empty_environment_has_no_signer(body: bytes) -> None:
    keyring = Keyring.from_env({})
    assert keyring.signer is None
    assert keyring.kids == []
    with pytest.raises(ConfigError):
        keyring.sign(body)
    with pytest.raises(SignatureInvalid):
        keyring.verify(body, Keyring.hmac(("k1", "s")).sign(body))


def test_hmac_keys_need_kid_and_secret() -> None:
    with pytest.raises(ConfigError):
        HmacKey.from_text("", "secret")
    with pytest.raises(ConfigError):
        HmacKey.from_text("k1", "")
    with pytest.raises(ConfigError):
        Keyring.hmac()


# Ed25519 PEM files ---------------------------------------------------------------------------


def write_pem_pair(tmp_path: Path, kid: str) -> tuple[Path, Path]:
    signer, _ = generate_ed25519_keypair(kid)
    private_pem, public_pem = ed25519_pem_pair(signer)
    assert private_pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert public_pem.startswith(b"-----BEGIN PUBLIC KEY-----")
    private_path = tmp_path / f"{kid}.pem"
    public_path = tmp_path / f"{kid}.pub.pem"
    private_path.write_bytes(private_pem)
    public_path.write_bytes(public_pem)
    return private_path, public_path


def test_ed25519_keys_loaded_from_pem_files_via_env(tmp_path: Path, body: bytes) -> None:
    private_path, public_path = write_pem_pair(tmp_path, "billing")
    producer = Keyring.from_env({"CHOREO_ED25519_SIGNING_KEY": f"billing={private_path}"})
    consumer = Keyring.from_env({"CHOREO_ED25519_VERIFY_KEYS": f"billing={public_path}"})
    assert isinstance(producer.signer, Ed25519Signer)
    assert consumer.signer is None

    headers = producer.sign(body)
    assert headers[ALG_HEADER] == ED25519
    assert headers[KID_HEADER] == "billing"
    consumer.verify(body, headers)
    tampered = body.replace(b"o-1", b"o-2")
    with pytest.raises(SignatureInvalid):
        consumer.verify(tampered, headers)


def test_ed25519_verify_keys_hold_several_producers(tmp_path: Path, body: bytes) -> None:
    priv_a, pub_a = write_pem_pair(tmp_path, "a")
    priv_b, pub_b = write_pem_pair(tmp_path, "b")
    consumer = Keyring.from_env({"CHOREO_ED25519_VERIFY_KEYS": f"a={pub_a}, b={pub_b}"})
    assert sorted(consumer.kids) == ["ed25519:a", "ed25519:b"]
    for kid, priv in (("a", priv_a), ("b", priv_b)):
        consumer.verify(body, Keyring.from_env({"CHOREO_ED25519_SIGNING_KEY": f"{kid}={priv}"}).sign(body))
    # b's signature presented under a's kid fails.
    b_headers = Keyring(Ed25519Signer.from_file("b", priv_b)).sign(body)
    with pytest.raises(SignatureInvalid, match="does not match"):
        consumer.verify(body, with_header(b_headers, KID_HEADER, "a"))


def test_ed25519_signing_key_wins_over_hmac_but_hmac_still_verifies(tmp_path: Path, body: bytes) -> None:
    private_path, _ = write_pem_pair(tmp_path, "p1")
    keyring = Keyring.from_env({"CHOREO_SIGNING_KEYS": "k1=s3cret", "CHOREO_ED25519_SIGNING_KEY": f"p1={private_path}"})
    headers = keyring.sign(body)
    assert (headers[ALG_HEADER], headers[KID_HEADER]) == (ED25519, "p1")
    keyring.verify(body, headers)
    keyring.verify(body, Keyring.hmac(("k1", "s3cret")).sign(body))


def test_ed25519_from_file_round_trip(tmp_path: Path, body: bytes) -> None:
    private_path, public_path = write_pem_pair(tmp_path, "p1")
    signer = Ed25519Signer.from_file("p1", private_path)
    verifier = Ed25519Verifier.from_file("p1", str(public_path))
    assert verifier.verify(body, bytes.fromhex(signer.sign(body)))


def test_ed25519_signing_key_holds_one_pair(tmp_path: Path) -> None:
    priv_a, _ = write_pem_pair(tmp_path, "a")
    priv_b, _ = write_pem_pair(tmp_path, "b")
    with pytest.raises(ConfigError, match="one kid=path"):
        Keyring.from_env({"CHOREO_ED25519_SIGNING_KEY": f"a={priv_a},b={priv_b}"})


def test_bad_key_files_raise_config_error(tmp_path: Path) -> None:
    private_path, public_path = write_pem_pair(tmp_path, "p1")
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"not a key\n")
    missing = tmp_path / "missing.pem"
    with pytest.raises(ConfigError, match="cannot read key file"):
        Keyring.from_env({"CHOREO_ED25519_SIGNING_KEY": f"p1={missing}"})
    with pytest.raises(ConfigError, match="cannot read key file"):
        Keyring.from_env({"CHOREO_ED25519_VERIFY_KEYS": f"p1={missing}"})
    with pytest.raises(ConfigError, match="private key"):
        Keyring.from_env({"CHOREO_ED25519_SIGNING_KEY": f"p1={garbage}"})
    with pytest.raises(ConfigError, match="public key"):
        Keyring.from_env({"CHOREO_ED25519_VERIFY_KEYS": f"p1={garbage}"})
    # A public key where a private one is expected, and the other way round.
    with pytest.raises(ConfigError):
        Keyring.from_env({"CHOREO_ED25519_SIGNING_KEY": f"p1={public_path}"})
    with pytest.raises(ConfigError):
        Keyring.from_env({"CHOREO_ED25519_VERIFY_KEYS": f"p1={private_path}"})
    with pytest.raises(ConfigError, match="CHOREO_ED25519_VERIFY_KEYS"):
        Keyring.from_env({"CHOREO_ED25519_VERIFY_KEYS": str(public_path)})


# interoperability with `openssl dgst -sha256 -hmac SECRET -hex` ------------------------------


def test_hmac_signature_matches_stdlib_hmac_sha256_over_raw_secret_bytes() -> None:
    secret = "Sup3r=secret ünïcode"
    expected = hmac.new(secret.encode("utf-8"), SPEC_BODY, hashlib.sha256).hexdigest()
    keyring = Keyring.from_env({"CHOREO_SIGNING_KEYS": f"k1={secret}"})
    assert keyring.sign(SPEC_BODY) == {ALG_HEADER: HMAC_SHA256, KID_HEADER: "k1", SIG_HEADER: expected}


def test_hmac_known_answer_rfc4231_case_2() -> None:
    """HMAC-SHA256(key="Jefe", "what do ya want for nothing?"), RFC 4231 test case 2."""
    expected = "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    assert Keyring.hmac(("k1", "Jefe")).sign(b"what do ya want for nothing?")[SIG_HEADER] == expected


def test_a_shell_producers_signature_verifies() -> None:
    """The producer of the wire-format doc: body signed with a plain HMAC, no choreo code."""
    sig = hmac.new(b"SECRET", SPEC_BODY, hashlib.sha256).hexdigest()
    consumer = Keyring.from_env({"CHOREO_SIGNING_KEYS": "k1=SECRET"})
    consumer.verify(SPEC_BODY, {ALG_HEADER: "hmac-sha256", KID_HEADER: "k1", SIG_HEADER: sig})
    assert parse_envelope(SPEC_BODY).payload == {"order_id": "o-1"}


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")
def test_openssl_cli_signature_verifies() -> None:
    openssl = shutil.which("openssl")
    assert openssl is not None
    result = subprocess.run(
        [openssl, "dgst", "-sha256", "-hmac", "SECRET", "-hex"],
        input=SPEC_BODY,
        capture_output=True,
        check=True,
    )
    sig = result.stdout.decode().strip().rsplit("= ", 1)[-1]
    assert sig == Keyring.hmac(("k1", "SECRET")).sign(SPEC_BODY)[SIG_HEADER]
    Keyring.hmac(("k1", "SECRET")).verify(SPEC_BODY, {ALG_HEADER: HMAC_SHA256, KID_HEADER: "k1", SIG_HEADER: sig})


def test_a_key_id_given_twice_is_a_configuration_error() -> None:
    """Signing took the first secret and verifying the last: choreo rejected its own events."""
    with pytest.raises(ConfigError, match="'k1' appears twice"):
        Keyring.from_env({"CHOREO_SIGNING_KEYS": "k1=new-secret,k1=old-secret"})
    assert sorted(Keyring.from_env({"CHOREO_SIGNING_KEYS": "k1=new-secret,k0=old-secret"}).kids) == [
        "hmac-sha256:k0",
        "hmac-sha256:k1",
    ]


def test_hmac_keys_pickle_deep_copy_and_expose_their_type_hints(body: bytes) -> None:
    """The pre-keyed hash states are rebuilt from the secret: a copied keyring (multiprocessing,
    copy.deepcopy of settings) still signs and verifies."""
    import copy
    import pickle
    import typing

    key = HmacKey("k", b"secret")
    for clone in (pickle.loads(pickle.dumps(key)), copy.deepcopy(key), copy.copy(key)):
        assert clone == key
        assert clone.sign(body) == key.sign(body)
    keyring = Keyring.hmac(("k", "secret"))
    copy.deepcopy(keyring).verify(body, keyring.sign(body))
    assert "secret" in typing.get_type_hints(HmacKey)

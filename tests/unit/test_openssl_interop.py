"""Signatures made by openssl, as docs/wire-format.md tells other teams to, verify in choreo."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from choreo import Keyring, SignatureInvalid

BODY = (
    b'{"id":"e-1","type":"order.placed","source":"shop","issued_at":"2026-11-20T10:00:00Z",'
    b'"trace_id":"4bf92f3577b34da6a3ce929d0e0e4736","payload":{"order_id":"o-1"}}'
)
pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")


def sh(script: str, cwd: Path) -> str:
    return subprocess.run(["bash", "-c", script], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def test_openssl_hmac_recipe_verifies(tmp_path: Path) -> None:
    (tmp_path / "body.json").write_bytes(BODY)
    sig = sh("openssl dgst -sha256 -hmac s3cret -hex < body.json | sed 's/^.*= //'", tmp_path)
    keyring = Keyring.from_env({"CHOREO_SIGNING_KEYS": "k1=s3cret"})
    headers = {"x-choreo-alg": "hmac-sha256", "x-choreo-kid": "k1", "x-choreo-sig": sig}
    keyring.verify(BODY, headers)
    assert keyring.sign(BODY)["x-choreo-sig"] == sig


def test_openssl_ed25519_recipe_verifies(tmp_path: Path) -> None:
    (tmp_path / "body.json").write_bytes(BODY)
    sh(
        "openssl genpkey -algorithm ed25519 -out private.pem && openssl pkey -in private.pem -pubout -out public.pem",
        tmp_path,
    )
    sig = sh("openssl pkeyutl -sign -inkey private.pem -rawin -in body.json | od -An -vtx1 | tr -d ' \\n'", tmp_path)
    keyring = Keyring.from_env({"CHOREO_ED25519_VERIFY_KEYS": f"p1={tmp_path / 'public.pem'}"})
    headers = {"x-choreo-alg": "ed25519", "x-choreo-kid": "p1", "x-choreo-sig": sig}
    keyring.verify(BODY, headers)
    with pytest.raises(SignatureInvalid):
        keyring.verify(BODY.replace(b"o-1", b"o-2"), headers)

"""Signatures over the exact body bytes (wire format v1, "Signature").

A :class:`Keyring` holds at most one signing key and any number of verification keys, each
under ``(alg, kid)``, so keys rotate by adding the new one everywhere, switching signers,
then removing the old one. The only module that imports ``cryptography``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import ConfigError, SignatureInvalid
from .log import get_logger

__all__ = [
    "ALG_HEADER",
    "ED25519",
    "HMAC_SHA256",
    "KID_HEADER",
    "SIG_HEADER",
    "Ed25519Signer",
    "Ed25519Verifier",
    "HmacKey",
    "Keyring",
    "generate_ed25519_keypair",
]

Alg = Literal["hmac-sha256", "ed25519"]
HMAC_SHA256: Final = "hmac-sha256"
ED25519: Final = "ed25519"
ALG_HEADER: Final = "x-choreo-alg"
KID_HEADER: Final = "x-choreo-kid"
SIG_HEADER: Final = "x-choreo-sig"
_ALGS: Final = (HMAC_SHA256, ED25519)


class Signer(Protocol):
    @property
    def alg(self) -> Alg: ...
    @property
    def kid(self) -> str: ...

    def sign(self, body: bytes) -> str:
        """Lowercase hex signature of ``body``."""
        ...


class Verifier(Protocol):
    @property
    def alg(self) -> Alg: ...
    @property
    def kid(self) -> str: ...

    def verify(self, body: bytes, signature: bytes) -> bool:
        """True iff ``signature`` (raw bytes) is valid for ``body``."""
        ...


_SHA256_BLOCK: Final = 64
if TYPE_CHECKING:
    from hashlib import _Hash as _HashState
else:  # the type exists for type checkers only; get_type_hints() must still resolve the name
    _HashState = object


@dataclass(frozen=True, slots=True)
class HmacKey:
    """A shared secret: signs and verifies. The key is the UTF-8 bytes of the secret, as is.

    HMAC-SHA256 (RFC 2104) is computed from the two keyed SHA-256 states, hashed once here and
    copied per message: ``hmac.digest`` sets the key up on every call, which on OpenSSL 3 cost
    about three times the hashing of a typical body.
    """

    kid: str
    secret: bytes
    alg: Alg = HMAC_SHA256
    _inner: _HashState = field(init=False, repr=False, compare=False)
    _outer: _HashState = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        key = hashlib.sha256(self.secret).digest() if len(self.secret) > _SHA256_BLOCK else self.secret
        key = key.ljust(_SHA256_BLOCK, b"\0")
        object.__setattr__(self, "_inner", hashlib.sha256(bytes(b ^ 0x36 for b in key)))
        object.__setattr__(self, "_outer", hashlib.sha256(bytes(b ^ 0x5C for b in key)))

    def __reduce__(self) -> tuple[type[HmacKey], tuple[str, bytes, Alg]]:
        # The hash states cannot be pickled (nor deep-copied): rebuild them from the secret.
        return (HmacKey, (self.kid, self.secret, self.alg))

    @classmethod
    def from_text(cls, kid: str, secret: str) -> HmacKey:
        if not kid or not secret:
            raise ConfigError("HMAC keys need a non-empty kid and secret")
        return cls(kid, secret.encode())

    def mac(self, body: bytes) -> bytes:
        """HMAC-SHA256 of ``body`` under this key (the same bytes as ``hmac.digest``)."""
        inner = self._inner.copy()
        inner.update(body)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()

    def sign(self, body: bytes) -> str:
        return self.mac(body).hex()

    def verify(self, body: bytes, signature: bytes) -> bool:
        return hmac.compare_digest(self.mac(body), signature)


@dataclass(frozen=True, slots=True)
class Ed25519Signer:
    kid: str
    private_key: Ed25519PrivateKey
    alg: Alg = ED25519

    def sign(self, body: bytes) -> str:
        return self.private_key.sign(body).hex()

    def verifier(self) -> Ed25519Verifier:
        return Ed25519Verifier(self.kid, self.private_key.public_key())

    @classmethod
    def from_file(cls, kid: str, path: str | Path) -> Ed25519Signer:
        return cls(kid, _load_private(Path(path)))


@dataclass(frozen=True, slots=True)
class Ed25519Verifier:
    kid: str
    public_key: Ed25519PublicKey
    alg: Alg = ED25519

    def verify(self, body: bytes, signature: bytes) -> bool:
        try:
            self.public_key.verify(signature, body)
        except InvalidSignature:
            return False
        return True

    @classmethod
    def from_file(cls, kid: str, path: str | Path) -> Ed25519Verifier:
        return cls(kid, _load_public(Path(path)))


def generate_ed25519_keypair(kid: str) -> tuple[Ed25519Signer, Ed25519Verifier]:
    signer = Ed25519Signer(kid, Ed25519PrivateKey.generate())
    return signer, signer.verifier()


def ed25519_pem_pair(signer: Ed25519Signer) -> tuple[bytes, bytes]:
    """(private PKCS#8 PEM, public SubjectPublicKeyInfo PEM), as ``openssl genpkey -algorithm ed25519`` writes."""
    private = signer.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = signer.private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public


def _load_private(path: Path) -> Ed25519PrivateKey:
    data = _read_key_file(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except ValueError as exc:
        raise ConfigError(f"{path}: not an unencrypted PEM private key ({exc})") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path}: not an Ed25519 private key")
    return key


def _load_public(path: Path) -> Ed25519PublicKey:
    data = _read_key_file(path)
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise ConfigError(f"{path}: not a PEM public key ({exc})") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path}: not an Ed25519 public key")
    return key


def _read_key_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read key file {path}: {exc.strerror}") from exc


def _header_text(value: object) -> str | None:
    if isinstance(value, bytes):
        try:
            return value.decode("ascii")
        except UnicodeDecodeError:
            return None
    return value if isinstance(value, str) else None


class Keyring:
    """Signs with one key and verifies against many.

    Contract: :meth:`verify` accepts a message only if its ``x-choreo-alg`` is allowed, a key
    with exactly that ``(alg, kid)`` is held, and the signature over the exact body bytes is
    valid. Unsigned messages pass only with ``accept_unsigned=True`` (a migration opt-in).
    """

    def __init__(
        self,
        signer: Signer | None = None,
        verifiers: list[Verifier] | None = None,
        *,
        allowed_algs: frozenset[str] = frozenset(_ALGS),
        accept_unsigned: bool = False,
    ) -> None:
        unknown = allowed_algs - set(_ALGS)
        if unknown:
            raise ConfigError(f"unknown signature algorithm(s): {', '.join(sorted(unknown))}")
        self.signer = signer
        self.allowed_algs = allowed_algs
        self.accept_unsigned = accept_unsigned
        if accept_unsigned:
            # An explicit, logged opt-in (wire format): unsigned events bypass authentication.
            get_logger("choreo.signing").warning(
                "accepting unsigned messages (CHOREO_ACCEPT_UNSIGNED): use only while migrating producers"
            )
        self._verifiers: dict[tuple[str, str], Verifier] = {}
        for verifier in verifiers or []:
            self._verifiers[(verifier.alg, verifier.kid)] = verifier
        if isinstance(signer, HmacKey):
            self._verifiers.setdefault((signer.alg, signer.kid), signer)
        elif isinstance(signer, Ed25519Signer):
            self._verifiers.setdefault((signer.alg, signer.kid), signer.verifier())

    # construction ------------------------------------------------------------------------
    @classmethod
    def hmac(cls, *pairs: tuple[str, str], accept_unsigned: bool = False) -> Keyring:
        """``Keyring.hmac(("k1", "new"), ("k0", "old"))``: the first signs, all verify."""
        if not pairs:
            raise ConfigError("Keyring.hmac needs at least one (kid, secret) pair")
        keys = [HmacKey.from_text(kid, secret) for kid, secret in pairs]
        return cls(keys[0], list(keys), accept_unsigned=accept_unsigned)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Keyring:
        """Build from ``CHOREO_*`` variables (see the configuration table in the README).

        - ``CHOREO_SIGNING_KEYS="k1=secret1,k0=oldsecret"``: HMAC keys; the first signs.
        - ``CHOREO_ED25519_SIGNING_KEY="kid=/path/private.pem"``: signs instead of HMAC.
        - ``CHOREO_ED25519_VERIFY_KEYS="kid=/path/public.pem,..."``: producers' public keys.
        - ``CHOREO_ALLOWED_ALGS="hmac-sha256,ed25519"``, ``CHOREO_ACCEPT_UNSIGNED=1``.
        """
        env = os.environ if environ is None else environ
        verifiers: list[Verifier] = []
        signer: Signer | None = None
        hmac_pairs = _parse_pairs(env.get("CHOREO_SIGNING_KEYS", ""), "CHOREO_SIGNING_KEYS")
        hmac_keys = [HmacKey.from_text(kid, secret) for kid, secret in hmac_pairs]
        verifiers.extend(hmac_keys)
        if hmac_keys:
            signer = hmac_keys[0]
        ed_signing = _parse_pairs(env.get("CHOREO_ED25519_SIGNING_KEY", ""), "CHOREO_ED25519_SIGNING_KEY")
        if len(ed_signing) > 1:
            raise ConfigError("CHOREO_ED25519_SIGNING_KEY holds one kid=path pair")
        if ed_signing:
            signer = Ed25519Signer.from_file(*ed_signing[0])
        for kid, path in _parse_pairs(env.get("CHOREO_ED25519_VERIFY_KEYS", ""), "CHOREO_ED25519_VERIFY_KEYS"):
            verifiers.append(Ed25519Verifier.from_file(kid, path))
        algs_text = env.get("CHOREO_ALLOWED_ALGS", "")
        allowed = frozenset(a.strip() for a in algs_text.split(",") if a.strip()) or frozenset(_ALGS)
        accept_unsigned = env.get("CHOREO_ACCEPT_UNSIGNED", "").lower() in {"1", "true", "yes"}
        return cls(signer, verifiers, allowed_algs=allowed, accept_unsigned=accept_unsigned)

    # use -----------------------------------------------------------------------------------
    @property
    def kids(self) -> list[str]:
        return [f"{alg}:{kid}" for alg, kid in self._verifiers]

    def sign(self, body: bytes) -> dict[str, str]:
        """The three signature headers for ``body``. Raises ConfigError without a signing key."""
        if self.signer is None:
            raise ConfigError("no signing key: set CHOREO_SIGNING_KEYS (e.g. k1=secret) or pass a Keyring")
        return {ALG_HEADER: self.signer.alg, KID_HEADER: self.signer.kid, SIG_HEADER: self.signer.sign(body)}

    def verify(self, body: bytes, headers: Mapping[str, object] | None) -> None:
        """Return if ``body`` carries a valid signature; raise :class:`SignatureInvalid` otherwise."""
        headers = headers or {}
        raw_alg, raw_kid, raw_sig = headers.get(ALG_HEADER), headers.get(KID_HEADER), headers.get(SIG_HEADER)
        if raw_alg is None and raw_kid is None and raw_sig is None:
            if self.accept_unsigned:
                return
            raise SignatureInvalid("message is not signed (no x-choreo-alg/kid/sig headers)")
        alg, kid, sig = _header_text(raw_alg), _header_text(raw_kid), _header_text(raw_sig)
        if not alg or not kid or not sig:
            raise SignatureInvalid("signature headers incomplete: need x-choreo-alg, x-choreo-kid and x-choreo-sig")
        if alg not in self.allowed_algs:
            raise SignatureInvalid(f"algorithm {alg!r} is not allowed")
        verifier = self._verifiers.get((alg, kid))
        if verifier is None:
            raise SignatureInvalid(f"unknown key id {kid!r} for {alg}")
        # fromhex() skips whitespace between pairs, but the header must be hex digits only: with
        # any whitespace (or an odd digit) the bytes would not be exactly half its length.
        try:
            signature = bytes.fromhex(sig)
        except ValueError:
            signature = b""
        if 2 * len(signature) != len(sig):
            raise SignatureInvalid("x-choreo-sig is not hex")
        if not verifier.verify(body, signature):
            raise SignatureInvalid(f"signature does not match the body (kid {kid!r})")


def _parse_pairs(text: str, name: str) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        kid, sep, value = item.partition("=")
        if not sep or not kid.strip() or not value:
            raise ConfigError(f"{name}: expected kid=value pairs separated by commas, got {item!r}")
        if any(kid.strip() == seen for seen, _ in pairs):
            # Signing would use the first secret and verifying the last: choreo would reject its own events.
            raise ConfigError(f"{name}: key id {kid.strip()!r} appears twice; each kid names one key")
        pairs.append((kid.strip(), value))
    return pairs

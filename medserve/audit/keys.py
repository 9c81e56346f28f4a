"""Key material of the audit log: one secret for the hashes, one signing key for checkpoints.

- The **audit secret** (32 random bytes, hex, file mode 0600) keys every hash in the log:
  the hash chain, and the HMACs of prompt and completion. Two sub-keys are derived from it
  so that a text HMAC can never be replayed as a chain hash. Whoever can write the database
  but does not hold this file cannot forge a chain that verifies.
- The **signing key** (Ed25519, PEM) signs checkpoints. Its public half is written beside
  it so checkpoints can be checked by someone who must not hold the secret.
- The **content key** (AES-256-GCM, only when content capture is on) encrypts prompts and
  completions for institutions that must retain them.

Missing files are created on first use (and logged), so a development server needs no
set-up; production keeps them on a different volume and owner than the database, and a
copy of each in escrow: without the secret, the log can no longer be verified.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from medserve.errors import unusable_file

log = logging.getLogger(__name__)

SECRET_BYTES = 32
NONCE_BYTES = 12


class AuditKeyError(Exception):
    """A key file is missing, unreadable or malformed; the message names the file."""


def _write_private(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 (never widening an existing file's mode)."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except OSError as exc:
        raise AuditKeyError(unusable_file(exc, "key file (to create)", path)) from None


def _exists(path: Path, what: str) -> bool:
    """Whether ``path`` exists; a path that cannot even be looked at (a directory without
    search permission, a name too long) is an :class:`AuditKeyError` naming it."""
    try:
        return path.exists()
    except OSError as exc:
        raise AuditKeyError(unusable_file(exc, what, path)) from None


def _read_hex_key(path: Path, what: str) -> bytes:
    try:
        raw = path.read_text(encoding="ascii").strip()
        key = bytes.fromhex(raw)
    except OSError as exc:
        raise AuditKeyError(unusable_file(exc, what, path)) from None
    except ValueError:
        raise AuditKeyError(f"the {what} {path} is not {SECRET_BYTES} bytes of hex") from None
    if len(key) != SECRET_BYTES:
        raise AuditKeyError(f"the {what} {path} is not {SECRET_BYTES} bytes of hex")
    return key


def load_or_create_secret(path: Path, what: str = "audit secret") -> bytes:
    """The 32-byte secret in ``path``; a new random one is written if the file is absent."""
    if not _exists(path, what):
        _write_private(path, secrets.token_hex(SECRET_BYTES).encode() + b"\n")
        log.warning(f"created a new {what}; keep a copy in escrow", extra={"path": str(path)})
    return _read_hex_key(path, what)


@dataclass(frozen=True)
class ChainKeys:
    """The sub-keys derived from the audit secret."""

    chain: bytes
    text: bytes
    key_id: str

    @classmethod
    def from_secret(cls, secret: bytes) -> ChainKeys:
        def derive(label: bytes) -> bytes:
            return hmac.new(secret, b"medserve-audit/" + label, hashlib.sha256).digest()

        return cls(
            chain=derive(b"chain/v1"), text=derive(b"text/v1"), key_id=derive(b"id")[:8].hex()
        )

    def record_hash(self, prev_hash: bytes, body: bytes) -> bytes:
        """The chain hash of a record: keyed over the previous hash and the exact body bytes."""
        return hmac.new(self.chain, prev_hash + body, hashlib.sha256).digest()

    def text_hmac(self, data: bytes) -> str:
        """Keyed hash of a prompt or completion: comparable, not reversible without the key."""
        return hmac.new(self.text, data, hashlib.sha256).hexdigest()


def signing_key_paths(path: Path) -> tuple[Path, Path]:
    """The private key file and its public half (``.pub`` beside it)."""
    return path, path.with_suffix(".pub")


def load_or_create_signing_key(path: Path) -> Ed25519PrivateKey:
    """The Ed25519 checkpoint key in ``path`` (PEM); created, with its ``.pub``, if absent."""
    private_path, public_path = signing_key_paths(path)
    if not _exists(private_path, "signing key"):
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        _write_private(private_path, pem)
        try:
            public_path.write_bytes(public_pem(key.public_key()))
        except OSError as exc:
            raise AuditKeyError(unusable_file(exc, "public key (to write)", public_path)) from None
        log.warning("created a new checkpoint signing key", extra={"path": str(private_path)})
    try:
        loaded = serialization.load_pem_private_key(private_path.read_bytes(), password=None)
    except OSError as exc:
        raise AuditKeyError(unusable_file(exc, "signing key", private_path)) from None
    except ValueError as exc:
        what = type(exc).__name__
        raise AuditKeyError(f"cannot load the signing key {private_path}: {what}") from None
    if not isinstance(loaded, Ed25519PrivateKey):
        raise AuditKeyError(f"the signing key {private_path} is not an Ed25519 key")
    return loaded


def public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_public_key(path: Path) -> Ed25519PublicKey:
    """A public key from a PEM file (a private key file is accepted too)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AuditKeyError(unusable_file(exc, "public key", path)) from None
    try:
        if b"PRIVATE KEY" in data:
            private = serialization.load_pem_private_key(data, password=None)
            if isinstance(private, Ed25519PrivateKey):
                return private.public_key()
        else:
            public = serialization.load_pem_public_key(data)
            if isinstance(public, Ed25519PublicKey):
                return public
    except ValueError:
        pass
    raise AuditKeyError(f"{path} does not hold an Ed25519 key in PEM form")


def key_fingerprint(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def signature_valid(key: Ed25519PublicKey, signature: bytes, message: bytes) -> bool:
    try:
        key.verify(signature, message)
    except InvalidSignature:
        return False
    return True


@dataclass(frozen=True)
class ContentCipher:
    """AES-256-GCM for captured content; the request id is bound in as associated data."""

    key: bytes

    def seal(self, plaintext: bytes, request_id: str) -> bytes:
        nonce = secrets.token_bytes(NONCE_BYTES)
        return nonce + AESGCM(self.key).encrypt(nonce, plaintext, request_id.encode())

    def open(self, sealed: bytes, request_id: str) -> bytes:
        """Decrypt; raises ``cryptography.exceptions.InvalidTag`` if altered or misbound."""
        nonce, ciphertext = sealed[:NONCE_BYTES], sealed[NONCE_BYTES:]
        return AESGCM(self.key).decrypt(nonce, ciphertext, request_id.encode())

"""Signature algorithms, keyed by the JWS ``alg`` of the protected header (PROTOCOL §5.2).

The envelope of a signature (``Bundle.signature``, the six header members, the detached
compact JWS) does not depend on the algorithm; only the bytes of the third JWS part do.
An algorithm is therefore a small object that signs and verifies those bytes over the
JWS signing input (RFC 7515 §5.1: ``BASE64URL(header) || '.' || BASE64URL(payload)``)
and says which keys are its own. :mod:`bridge.trust.jws` looks algorithms up here by
name and never branches on one.

Two are registered: ``ES256`` (ECDSA on P-256 with SHA-256, RFC 7518 §3.4, the
signature as the 64 bytes R || S) and ``Ed25519`` (RFC 8032, the fully specified JOSE
name of RFC 9864). Another (an SM2 signer, GB/T 32918.2 with SM3, once a well-kept
Python library offers it over X.509 keys) is added with :func:`register` and chosen per
link in the configuration (``[[links]] signature_algorithm``); a verifier accepts from a
partner only the algorithms its links with that partner name (:class:`~bridge.trust.jws.KeyRing`).

``none``, the HMAC family and anything else not registered are refused by name before
any key is looked at: a token cannot choose a symmetric algorithm and be checked with a
public key as its secret.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)


class SignatureAlgorithm(ABC):
    """One JWS signature algorithm: its ``alg`` name, its keys, sign and verify."""

    #: The JWS ``alg`` value (RFC 7518 / RFC 9864 name).
    name: str
    #: The keys it takes, for error messages and documentation ("EC P-256").
    key_kind: str

    @abstractmethod
    def owns(self, key: Any) -> bool:
        """True when ``key`` (private or public) is a key of this algorithm."""

    @abstractmethod
    def sign(self, private_key: Any, signing_input: bytes) -> bytes:
        """The JWS signature bytes of ``signing_input`` under ``private_key``."""

    @abstractmethod
    def verify(self, public_key: Any, signature: bytes, signing_input: bytes) -> bool:
        """True when ``signature`` is valid for ``signing_input`` under ``public_key``.

        Never raises for a malformed signature: a wrong length or an out-of-range value
        is simply not valid.
        """


class ES256(SignatureAlgorithm):
    """ECDSA on P-256 with SHA-256; the JWS signature is R || S, 32 bytes each."""

    name = "ES256"
    key_kind = "EC P-256"
    _SIZE = 32

    def owns(self, key: Any) -> bool:
        return isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)) and (
            isinstance(key.curve, ec.SECP256R1)
        )

    def sign(self, private_key: Any, signing_input: bytes) -> bytes:
        der = private_key.sign(signing_input, ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return r.to_bytes(self._SIZE, "big") + s.to_bytes(self._SIZE, "big")

    def verify(self, public_key: Any, signature: bytes, signing_input: bytes) -> bool:
        if len(signature) != 2 * self._SIZE:
            return False
        r = int.from_bytes(signature[: self._SIZE], "big")
        s = int.from_bytes(signature[self._SIZE :], "big")
        if r == 0 or s == 0:
            return False
        try:
            public_key.verify(encode_dss_signature(r, s), signing_input, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            return False
        return True


class Ed25519(SignatureAlgorithm):
    """EdDSA on edwards25519 (RFC 8032); the JWS signature is its 64 bytes."""

    name = "Ed25519"
    key_kind = "Ed25519"

    def owns(self, key: Any) -> bool:
        return isinstance(key, (ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey))

    def sign(self, private_key: Any, signing_input: bytes) -> bytes:
        return bytes(private_key.sign(signing_input))

    def verify(self, public_key: Any, signature: bytes, signing_input: bytes) -> bool:
        if len(signature) != 64:
            return False
        try:
            public_key.verify(signature, signing_input)
        except InvalidSignature:
            return False
        return True


_ALGORITHMS: dict[str, SignatureAlgorithm] = {}


def register(algorithm: SignatureAlgorithm) -> None:
    """Make ``algorithm`` available to signers, verifiers and the configuration.

    A name is registered once: replacing ``ES256`` with another implementation at run
    time would change what every partner's signatures mean.
    """
    if not isinstance(algorithm, SignatureAlgorithm):
        raise TypeError("a signature algorithm must subclass SignatureAlgorithm")
    if algorithm.name in _ALGORITHMS:
        raise ValueError(f"signature algorithm {algorithm.name} is already registered")
    _ALGORITHMS[algorithm.name] = algorithm


def unregister(name: str) -> None:
    """Remove an algorithm added with :func:`register` (the built-in ones stay)."""
    if name in _BUILT_IN:
        raise ValueError(f"signature algorithm {name} is built in")
    _ALGORITHMS.pop(name, None)


def get(name: str) -> SignatureAlgorithm | None:
    """The registered algorithm called ``name``, or None."""
    return _ALGORITHMS.get(name)


def names() -> tuple[str, ...]:
    """Names of the registered algorithms, built-in ones first."""
    return tuple(_ALGORITHMS)


def for_key(key: Any) -> SignatureAlgorithm | None:
    """The registered algorithm whose keys ``key`` is (private or public), or None."""
    for algorithm in _ALGORITHMS.values():
        if algorithm.owns(key):
            return algorithm
    return None


def key_kinds() -> str:
    """The key kinds of every registered algorithm, for messages: 'EC P-256 or Ed25519'."""
    kinds = [a.key_kind for a in _ALGORITHMS.values()]
    return kinds[0] if len(kinds) == 1 else ", ".join(kinds[:-1]) + " or " + kinds[-1]


for _algorithm in (ES256(), Ed25519()):
    register(_algorithm)
_BUILT_IN = frozenset(_ALGORITHMS)

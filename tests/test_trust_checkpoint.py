"""Signed checkpoints and cosignatures: the note format and the extension rule."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from bridge.ledger import merkle
from bridge.trust.checkpoint import (
    CheckpointError,
    check_extends,
    cosign,
    cosignatures,
    origin_for,
    parse_checkpoint,
    sign_checkpoint,
    verify_checkpoint,
)

NOW = datetime(2026, 12, 5, 1, 2, 3, tzinfo=UTC)
LEAVES = [merkle.leaf_hash(str(i).encode()) for i in range(20)]


@pytest.fixture(params=["ec", "ed25519"])
def key(request: pytest.FixtureRequest) -> ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey:
    if request.param == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    return ed25519.Ed25519PrivateKey.generate()


def cp_at(key, size: int, leaves: list[bytes] = LEAVES):  # type: ignore[no-untyped-def]
    return sign_checkpoint(key, "insurer-b", origin_for("insurer-b"), size,
                           merkle.root(leaves[:size]), NOW)


def test_checkpoint_text_follows_the_signed_note_layout(key) -> None:  # type: ignore[no-untyped-def]
    cp = cp_at(key, 7)
    lines = cp.note.split("\n")
    assert lines[0] == "ws-fhir-bridge/audit/insurer-b" and lines[1] == "7"
    assert lines[3] == "time 2026-12-05T01:02:03.000000+00:00" and lines[4] == ""
    assert lines[5].startswith("\u2014 insurer-b ")
    back = verify_checkpoint(cp.note, "insurer-b", [key.public_key()])
    assert (back.size, back.root) == (7, merkle.root(LEAVES[:7]))


def test_a_changed_size_or_root_or_foreign_key_fails(key) -> None:  # type: ignore[no-untyped-def]
    cp = cp_at(key, 7)
    forged = cp.note.replace("\n7\n", "\n6\n", 1)
    with pytest.raises(CheckpointError, match="no valid signature") as err:
        verify_checkpoint(forged, "insurer-b", [key.public_key()])
    assert err.value.location == "checkpoint ws-fhir-bridge/audit/insurer-b@6"
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(CheckpointError, match="no valid signature"):
        verify_checkpoint(cp.note, "insurer-b", [other])
    with pytest.raises(CheckpointError, match="not of hospital-a"):
        verify_checkpoint(cp.note, "hospital-a", [key.public_key()])
    with pytest.raises(CheckpointError, match="4 lines"):
        parse_checkpoint("a\nb\n\n\u2014 x AAAAAAA=\n")


def test_cosignature_verifies_and_names_its_time(key) -> None:  # type: ignore[no-untyped-def]
    cp = cp_at(key, 7)
    witness = ec.generate_private_key(ec.SECP256R1())
    note = cosign(cp, witness, "hospital-a", NOW + timedelta(seconds=5))
    assert verify_checkpoint(note, "insurer-b", [key.public_key()]).size == 7
    assert cosignatures(note, "hospital-a", [witness.public_key()]) == [NOW + timedelta(seconds=5)]
    assert cosignatures(cp.note, "hospital-a", [witness.public_key()]) == []
    # The cosignature covers the checkpoint text: moved to another checkpoint it fails.
    cosig_line = note.rsplit("\n", 2)[1]
    moved = cp_at(key, 8).note + cosig_line + "\n"
    with pytest.raises(CheckpointError, match="does not verify"):
        cosignatures(moved, "hospital-a", [witness.public_key()])


def test_extension_is_checked_against_the_last_cosigned(key) -> None:  # type: ignore[no-untyped-def]
    old, new = cp_at(key, 5), cp_at(key, 13)
    check_extends(old, new, merkle.consistency_proof(5, LEAVES[:13]))
    check_extends(None, new, [])
    # Truncated tail / older copy of the store.
    with pytest.raises(CheckpointError, match="shrank from 13 to 5") as err:
        check_extends(new, old, [])
    assert "insurer-b@13" in str(err.value) and err.value.location.endswith("@5")
    # A rewritten entry 3: same sizes, other roots.
    forked = LEAVES[:2] + [merkle.leaf_hash(b"rewritten")] + LEAVES[3:]
    fork13 = cp_at(key, 13, forked)
    with pytest.raises(CheckpointError, match="inconsistent with checkpoint .*@5"):
        check_extends(old, fork13, merkle.consistency_proof(5, forked[:13]))
    with pytest.raises(CheckpointError, match="another root for the same size"):
        check_extends(new, fork13, [])

"""The outside peer as the conformance kit's receipt checker: a receipt that is signed
correctly but says the wrong thing (who answered, to whom, when) must not pass it.

Receipts come from a running receiver; the wrong ones are the genuine receipt changed
and signed again with the receiver's own key, the way a faulty bridge would issue them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from e2e_support import Pair, start_pair
from peer_support import call, make_peer

from bridge.conformance.envelope import JWSOptions, PeerCheckFailed, SigningKey, sign_message


@pytest.fixture
async def pair(tmp_path: Path) -> Any:
    p = await start_pair(tmp_path, start_dispatch=False)
    try:
        yield p
    finally:
        await p.stop()


def _header(receipt: dict[str, Any]) -> dict[str, Any]:
    return receipt["entry"][0]["resource"]  # type: ignore[no-any-return]


def _sender(r: dict[str, Any]) -> None:
    _header(r)["sender"]["identifier"]["value"] = "clinic-x"


def _receiver(r: dict[str, Any]) -> None:
    _header(r)["destination"][0]["receiver"]["identifier"]["value"] = "clinic-x"


def _two_destinations(r: dict[str, Any]) -> None:
    _header(r)["destination"].append(copy.deepcopy(_header(r)["destination"][0]))


def _no_destination(r: dict[str, Any]) -> None:
    del _header(r)["destination"]


@pytest.mark.parametrize("change", [_sender, _receiver, _two_destinations, _no_destination])
async def test_a_receipt_naming_the_wrong_parties_fails_the_peer(
    pair: Pair, change: Callable[[dict[str, Any]], None]
) -> None:
    peer = make_peer(pair)
    message = peer.signed_claim()
    answer = await call(peer.send, message)
    assert answer.status == 200 and answer.receipt_error is None
    receipt = answer.response.json()
    peer.check_receipt(message, receipt)  # the genuine one passes

    wrong = copy.deepcopy(receipt)
    change(wrong)
    pki = pair.root / "pki" / "insurer-b"
    resigned = sign_message(wrong, SigningKey.from_files(pki / "sign.key", pki / "sign.pem"),
                            iss="insurer-b", aud="hospital-a")
    with pytest.raises(PeerCheckFailed):
        peer.check_receipt(message, resigned)


@pytest.mark.parametrize("iat", ["1700000000", 1.7e9, True])
async def test_a_receipt_whose_iat_is_not_an_integer_fails_the_peer(pair: Pair, iat: Any) -> None:
    peer = make_peer(pair)
    message = peer.signed_claim()
    answer = await call(peer.send, message)
    receipt = answer.response.json()
    pki = pair.root / "pki" / "insurer-b"
    resigned = sign_message(receipt, SigningKey.from_files(pki / "sign.key", pki / "sign.pem"),
                            iss="insurer-b", aud="hospital-a",
                            options=JWSOptions(overrides={"iat": iat}))
    with pytest.raises(PeerCheckFailed):
        peer.check_receipt(message, resigned)

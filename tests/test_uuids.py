"""Identities made as text are the version-5 UUIDs RFC 4122 defines (a partner, or a
later release, deriving a resource, message or receipt identity gets the same one)."""

from __future__ import annotations

import uuid

from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.mapping.engine import ID_NAMESPACE
from bridge.messages import MESSAGE_NAMESPACE
from bridge.trust.receipts import RECEIPT_NAMESPACE
from bridge.uuids import uuid5_text

NAMESPACES = [ID_NAMESPACE, MESSAGE_NAMESPACE, RECEIPT_NAMESPACE, uuid.NAMESPACE_URL]


@settings(max_examples=500)
@given(st.sampled_from(NAMESPACES),
       # Any text UTF-8 can write (Chinese names, the separators ids use): not a lone
       # surrogate, which neither writes.
       st.text(alphabet=st.characters(blacklist_categories=("Cs",))))
def test_uuid5_text_is_the_standard_library_uuid5(namespace: uuid.UUID, name: str) -> None:
    text = uuid5_text(namespace, name)
    assert text == str(uuid.uuid5(namespace, name))
    parsed = uuid.UUID(text)
    assert parsed.version == 5 and parsed.variant == uuid.RFC_4122


def test_a_known_identity() -> None:
    # RFC 4122 appendix B's example name in the DNS namespace, as Python documents it.
    assert uuid5_text(uuid.NAMESPACE_DNS, "python.org") == "886313e1-3b8a-5372-9b90-0c9aee199e5d"

"""How health data is sealed before it is written to a store, and opened after.

A store holds one :class:`Sealer`. :class:`PlainSealer`, the default, stores bytes as
they are; an encrypting sealer (a data key from a file or the environment) replaces
it without any table code changing, because every health-data column is written
through :meth:`bridge.ledger.portable.Tx.seal` and read through ``unseal``.
"""

from __future__ import annotations

from typing import Protocol


class Sealer(Protocol):
    """Seal and open stored values; ``context`` names the table and column."""

    def seal(self, data: bytes, *, context: str) -> bytes: ...
    def unseal(self, data: bytes, *, context: str) -> bytes: ...


class PlainSealer:
    """No encryption at rest: values are stored as given."""

    def seal(self, data: bytes, *, context: str) -> bytes:
        return bytes(data)

    def unseal(self, data: bytes, *, context: str) -> bytes:
        return bytes(data)

"""MLLP framing and the few MSH fields a listener needs, as plain code over bytes.

Nothing here does I/O: bytes go in, complete messages (and framing errors) come out,
so the same framer serves a TCP listener, a TLS listener and a test that feeds it
one byte at a time.

MLLP (HL7 v2 Minimal Lower Layer Protocol, release 2) wraps each message as::

    <VT 0x0B> message bytes <FS 0x1C><CR 0x0D>

Framer rules (state table; ``OUTSIDE`` is the start state):

==========  ===================  ==========================================================
state       byte(s)              action
==========  ===================  ==========================================================
OUTSIDE     VT                   start a frame -> INSIDE; bytes other than whitespace
                                 held outside are dropped, counted in ``unframed_dropped``
OUTSIDE     FS CR                after bytes other than whitespace: emit
                                 :class:`MissingStartBlock` (the peer sent a message
                                 without its VT and waits for its answer); else count
                                 in ``stray_end_blocks``
OUTSIDE     anything else        discard, count in ``discarded_bytes`` (the first
                                 ``HEAD_BYTES`` are kept for a MissingStartBlock)
INSIDE      FS CR                emit the frame, an empty one too (the peer waits for an
                                 answer to it as to any other) -> OUTSIDE
INSIDE      FS then not CR       FS is content (a strict peer never sends it) -> INSIDE
INSIDE      VT                   the peer restarted a frame: drop the partial frame,
                                 count it in ``aborted_frames`` -> INSIDE (new frame)
INSIDE      content over limit   emit :class:`FrameTooLarge` once, discard -> SKIPPING
SKIPPING    FS CR                the oversized frame ended (answered already) -> OUTSIDE
SKIPPING    VT                   as OUTSIDE (the oversized frame was abandoned)
SKIPPING    anything else        discard
==========  ===================  ==========================================================

Invariants: a message is emitted only after its FS CR arrived; the emitted bytes
never contain the VT or the FS CR; the framer never holds more than
``max_message_bytes`` (+1) bytes of a frame, nor more than ``HEAD_BYTES`` outside one;
events come out in the order their frames ended on the wire; every end block the
peer sent after content gives exactly one event (a message, :class:`FrameTooLarge` or
:class:`MissingStartBlock`), so the peer gets one answer for each message it sent.

The framer knows nothing of HL7 itself: reading MSH, error codes and acknowledgements
belong to the HL7 v2 room (:mod:`bridge.mapping.hl7v2.header`, :mod:`bridge.mapping.hl7v2.ack`).
"""

from __future__ import annotations

from bridge.errors import ParseError, PayloadTooLarge

VT = 0x0B  # start block
FS = 0x1C  # end block
CR = 0x0D  # carriage return, closes the end block and separates segments

START_BLOCK = bytes([VT])
END_BLOCK = bytes([FS, CR])

DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024


class FrameTooLarge(PayloadTooLarge):
    """An MLLP frame grew beyond the configured maximum; it was discarded.

    ``head`` keeps the first bytes of the frame (at most :attr:`MLLPFramer.HEAD_BYTES`)
    so the listener can still name MSH-10 in its AR answer. ``messages`` holds the
    messages that completed before the oversized frame in the same :meth:`MLLPFramer.feed`
    call (see there).
    """

    code = "mllp-frame-too-large"

    def __init__(self, message: str, *, head: bytes = b"", limit: int = 0) -> None:
        super().__init__(message, location="MLLP frame")
        self.head = head
        self.limit = limit
        self.messages: list[bytes] = []


class MissingStartBlock(ParseError):
    """Bytes other than whitespace ended by an end block (FS CR) outside any frame: a
    message sent without its start block (VT). It is answered (AR) rather than dropped,
    because its sender waits for the answer.

    ``head`` keeps the first bytes (at most :attr:`MLLPFramer.HEAD_BYTES`), so the
    answer can name MSH-10 when an MSH is there; ``messages`` as for
    :class:`FrameTooLarge`.
    """

    code = "mllp-no-start-block"

    def __init__(self, message: str, *, head: bytes = b"") -> None:
        super().__init__(message, location="MLLP frame")
        self.head = head
        self.messages: list[bytes] = []


Event = bytes | FrameTooLarge | MissingStartBlock


class MLLPFramer:
    """Turns a byte stream into complete MLLP messages (see the module docstring)."""

    #: How much of an oversized frame is kept for the error's ``head``.
    HEAD_BYTES = 4096

    def __init__(self, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        """``max_message_bytes`` bounds the content of one frame (VT and FS CR excluded)."""
        if max_message_bytes < 1:
            raise ValueError("max_message_bytes must be positive")
        self.max_message_bytes = max_message_bytes
        self._inside = False
        self._fs_pending = False  # INSIDE and the last byte seen was FS
        self._skipping = False  # the rest of an oversized frame, up to its end block
        self._stray_fs = False  # OUTSIDE and the last byte seen was FS
        self._stray_head = bytearray()  # the first bytes held outside any frame
        self._stray_content = False  # bytes other than whitespace held outside any frame
        self._buf = bytearray()
        self._pending: list[Event] = []
        #: Bytes seen outside any frame (noise, keep-alives, the tail of an oversized frame).
        self.discarded_bytes = 0
        #: Frames cut short by a new VT.
        self.aborted_frames = 0
        #: Frames of zero length (VT FS CR): emitted as ``b""`` like any other message.
        self.empty_frames = 0
        #: Messages sent without a start block, emitted as :class:`MissingStartBlock`.
        self.unframed_messages = 0
        #: Runs of bytes other than whitespace outside any frame that no end block
        #: ended (dropped at the next start block).
        self.unframed_dropped = 0
        #: End blocks outside any frame with nothing but whitespace before them.
        self.stray_end_blocks = 0
        #: Frames discarded for exceeding ``max_message_bytes``.
        self.oversized_frames = 0
        #: Start blocks seen that began a frame: changes whenever a new frame begins, so a
        #: caller can time each frame from its start.
        self.frames_started = 0
        #: Frames ended by their end block (empty ones too): changes whenever a frame ends.
        #: A start block that abandons an unended frame does not change it, so a caller
        #: timing frames from the last one ended gives a peer that keeps restarting its
        #: frame no more time than one that never ends it.
        self.frames_ended = 0

    @property
    def in_frame(self) -> bool:
        """True while a frame has started and not yet ended (bytes are being held)."""
        return self._inside

    @property
    def buffered(self) -> int:
        """Bytes of the current, unfinished frame held by the framer."""
        return len(self._buf) + (1 if self._fs_pending else 0)

    @property
    def holds_unframed(self) -> bool:
        """True while bytes other than whitespace were received outside any frame and
        neither an end block nor a start block followed them yet."""
        return self._stray_content

    # --- decoding ------------------------------------------------------------------------

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; return the messages completed by them, in wire order.

        An oversized frame raises :class:`FrameTooLarge` (a message without its start
        block :class:`MissingStartBlock`) at the point where it occurs:
        the messages completed before it in this call are in the exception's
        ``messages``; whatever followed it is kept and returned by the next call
        (``feed(b"")`` collects it). Use :meth:`events` to get messages and errors in
        one list instead.
        """
        events = self._pending + self._decode(data)
        self._pending = []
        messages: list[bytes] = []
        for i, event in enumerate(events):
            if not isinstance(event, bytes):
                self._pending = events[i + 1 :]
                event.messages = messages
                raise event
            messages.append(event)
        return messages

    def events(self, data: bytes) -> list[Event]:
        """Like :meth:`feed`, but framing errors appear in the list, in order, instead of raising."""
        events = self._pending + self._decode(data)
        self._pending = []
        return events

    def _decode(self, data: bytes) -> list[Event]:
        out: list[Event] = []
        i, n = 0, len(data)
        if self._fs_pending and n:
            self._fs_pending = False
            if data[0] == CR:
                self._finish(out)
                i = 1
            else:
                self._append(b"\x1c", out)
        elif self._stray_fs and n:
            self._stray_fs = False
            if data[0] == CR:
                self._end_outside(out)
                i = 1
            else:
                self._outside(b"\x1c")
        while i < n:
            if not self._inside:
                start = data.find(START_BLOCK, i)
                self._scan_outside(data, i, start if start >= 0 else n, out)
                if start < 0:
                    return out
                self._begin_frame()
                i = start + 1
                continue
            end = data.find(b"\x1c", i)
            restart = data.find(START_BLOCK, i, end if end >= 0 else n)
            if restart >= 0:
                # A new frame begins before this one ended: the peer gave up on it.
                self.aborted_frames += 1
                self.frames_started += 1
                self.discarded_bytes += len(self._buf) + (restart - i)
                self._buf.clear()
                i = restart + 1
                continue
            if end < 0:
                self._append(data[i:], out)
                return out
            self._append(data[i:end], out)
            if not self._inside:  # the frame overflowed and was dropped
                i = end
                continue
            if end + 1 == n:
                self._fs_pending = True
                return out
            if data[end + 1] == CR:
                self._finish(out)
                i = end + 2
            else:
                self._append(b"\x1c", out)
                i = end + 1
        return out

    def _append(self, chunk: bytes, out: list[Event]) -> None:
        if not self._inside:
            self.discarded_bytes += len(chunk)
            return
        if len(self._buf) + len(chunk) > self.max_message_bytes:
            room = self.HEAD_BYTES - len(self._buf)
            head = bytes(self._buf[: self.HEAD_BYTES]) + (chunk[:room] if room > 0 else b"")
            self.discarded_bytes += len(self._buf) + len(chunk)
            self.oversized_frames += 1
            self._buf.clear()
            self._inside = False
            self._skipping = True
            out.append(
                FrameTooLarge(
                    f"MLLP frame larger than {self.max_message_bytes} bytes",
                    head=head,
                    limit=self.max_message_bytes,
                )
            )
            return
        self._buf += chunk

    def _finish(self, out: list[Event]) -> None:
        self._inside = False
        self.frames_ended += 1
        if not self._buf:
            self.empty_frames += 1
        out.append(bytes(self._buf))
        self._buf.clear()

    # --- outside any frame -----------------------------------------------------------------

    def _begin_frame(self) -> None:
        if self._stray_content:
            self.unframed_dropped += 1
        self._reset_stray()
        self._skipping = False
        self._inside = True
        self.frames_started += 1
        self._buf.clear()

    def _scan_outside(self, data: bytes, i: int, stop: int, out: list[Event]) -> None:
        """Take ``data[i:stop]``, bytes outside any frame (``stop``: a start block or the end)."""
        while True:
            end = data.find(END_BLOCK, i, stop)
            if end < 0:
                break
            self._outside(data[i:end])
            self._end_outside(out)
            i = end + 2
        if stop == len(data) and i < stop and data[stop - 1] == FS:
            # The CR that would make it an end block may come with the next bytes.
            self._outside(data[i : stop - 1])
            self._stray_fs = True
        else:
            self._outside(data[i:stop])

    def _outside(self, chunk: bytes) -> None:
        if not chunk:
            return
        self.discarded_bytes += len(chunk)
        if self._skipping:
            return
        room = self.HEAD_BYTES - len(self._stray_head)
        if room > 0:
            self._stray_head += chunk[:room]
        if not self._stray_content and chunk.strip():
            self._stray_content = True

    def _end_outside(self, out: list[Event]) -> None:
        """An end block (FS CR) outside any frame."""
        self.discarded_bytes += 2
        if self._skipping:
            self._skipping = False  # the oversized frame ended; it was answered already
            return
        if self._stray_content:
            self.unframed_messages += 1
            out.append(MissingStartBlock("MLLP start block (VT) missing before the message",
                                         head=bytes(self._stray_head)))
        else:
            self.stray_end_blocks += 1
        self._reset_stray()

    def _reset_stray(self) -> None:
        self._stray_head.clear()
        self._stray_content = False
        self._stray_fs = False

    # --- encoding ------------------------------------------------------------------------

    @staticmethod
    def frame(message: bytes) -> bytes:
        """Wrap one message for the wire. Refuses content that would break the framing."""
        if START_BLOCK in message or END_BLOCK in message:
            raise ValueError("an MLLP message cannot contain VT or FS CR")
        return START_BLOCK + message + END_BLOCK


def frame(message: bytes) -> bytes:
    """Module-level shortcut for :meth:`MLLPFramer.frame`."""
    return MLLPFramer.frame(message)

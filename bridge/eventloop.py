"""Which event loop a long-running bridge process runs on.

The standard library's loop by default; ``uvloop`` (libuv) when the configuration
(``[server] event_loop``) or the ``BRIDGE_EVENT_LOOP`` environment variable names it,
and ``auto`` for uvloop when it is installed. Asking for ``uvloop`` without it
installed fails clearly. The environment variable wins over the configuration: it is
how an operator switches one process without editing a shared file.

On this project's benchmark (bench/claim_push.py, ``--loop``) uvloop did not show a
difference in CPU per claim beyond the noise of a shared host, so it is not the
default; the TLS listener works on both (bridge.link.tlsgate).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from bridge.errors import ConfigError

T = TypeVar("T")

CHOICES = ("auto", "uvloop", "asyncio")
ENV = "BRIDGE_EVENT_LOOP"


def loop_factory(choice: str = "asyncio") -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The factory of the loop ``choice`` names (``BRIDGE_EVENT_LOOP`` overriding it);
    None for the standard library's loop."""
    choice = os.environ.get(ENV, "").strip().lower() or choice
    if choice not in CHOICES:
        raise ConfigError(f"event loop must be one of {', '.join(CHOICES)}", location=ENV)
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ConfigError("uvloop is asked for but not installed",
                              location="server.event_loop") from None
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T], choice: str = "asyncio") -> T:
    """``asyncio.run(main)`` on the loop ``choice`` names."""
    with asyncio.Runner(loop_factory=loop_factory(choice)) as runner:
        return runner.run(main)


def loop_name() -> str:
    """The running loop's kind, for the ready line and logs."""
    loop = asyncio.get_running_loop()
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"

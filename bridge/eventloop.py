"""Which event loop a long-running bridge process runs on.

``uvloop`` (libuv) costs less CPU per request than the standard library's loop for
the same HTTP and TLS work, and is used when it is installed, unless the
configuration (``[server] event_loop``) or the ``BRIDGE_EVENT_LOOP`` environment
variable says ``asyncio``. ``uvloop`` asks for it and fails clearly when it is
missing. The environment variable wins over the configuration: it is how an operator
switches one process back without editing a shared file.
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


def loop_factory(choice: str = "auto") -> Callable[[], asyncio.AbstractEventLoop] | None:
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


def run(main: Coroutine[Any, Any, T], choice: str = "auto") -> T:
    """``asyncio.run(main)`` on the loop ``choice`` names."""
    with asyncio.Runner(loop_factory=loop_factory(choice)) as runner:
        return runner.run(main)


def loop_name() -> str:
    """The running loop's kind, for the ready line and logs."""
    loop = asyncio.get_running_loop()
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"

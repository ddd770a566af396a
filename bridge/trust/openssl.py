"""Two OpenSSL settings Python 3.11's ``ssl`` module does not expose, set through ctypes.

* **Key-exchange groups.** ``SSLContext.set_groups`` only exists in newer Pythons; on
  3.11 OpenSSL 3's default list applies, which also offers P-521, X448 and the FFDHE
  groups. ``SSL_CTX_set1_groups_list`` restricts it to Mozilla's intermediate profile.
* **The server-side session cache.** ``OP_NO_TICKET`` stops TLS 1.2 tickets, but
  OpenSSL still keeps a session-id cache on every server context, and Python gives
  each server context a session-id context, so a TLS 1.2 client can resume by session
  id. ``SSL_CTX_set_session_cache_mode(SSL_SESS_CACHE_OFF)`` turns it off.

How the ``SSL_CTX *`` is found: CPython's ``_ssl._SSLContext`` object is
``PyObject_HEAD`` followed by the ``SSL_CTX *`` (Modules/_ssl.c, every version since
3.x). The pointer read there is not trusted blindly: ``SSL_CTX_get_options`` and
``SSL_CTX_get_verify_mode`` through it must return what Python reports for the same
context, before anything is written. When any of this fails the caller gets a
:class:`NativeTLSUnavailable` and decides; the bridge refuses to start rather than
run with weaker settings than PROTOCOL §2 promises.

The library is the ``libssl`` the ``_ssl`` module itself loaded (found in the process's
memory map), never another copy on the system.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from typing import Any

_SSL_CTRL_SET_SESS_CACHE_MODE = 44
_SSL_CTRL_GET_SESS_CACHE_MODE = 45
_SSL_CTRL_SET_GROUPS_LIST = 92
_SSL_SESS_CACHE_OFF = 0
_VERIFY_MODES = {0: 0, 1: 1, 2: 3}  # ssl.CERT_* -> SSL_VERIFY_* (REQUIRED = PEER|FAIL_IF_NO)


class NativeTLSUnavailable(RuntimeError):
    """The OpenSSL settings cannot be applied safely in this Python build."""


def _loaded_libssl() -> str | None:
    try:
        with open("/proc/self/maps", encoding="ascii", errors="replace") as maps:
            for line in maps:
                path = line.rsplit(None, 1)[-1] if "libssl" in line else ""
                if "/libssl.so" in path:
                    return path
    except OSError:
        pass
    return ctypes.util.find_library("ssl")


@functools.cache
def _libssl() -> Any:
    import _ssl  # noqa: F401  (make sure the library is loaded before looking for it)

    path = _loaded_libssl()
    if path is None:
        raise NativeTLSUnavailable("the OpenSSL library used by Python cannot be located")
    lib = ctypes.CDLL(path)
    lib.SSL_CTX_ctrl.restype = ctypes.c_long
    lib.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
    lib.SSL_CTX_get_options.restype = ctypes.c_uint64
    lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
    lib.SSL_CTX_get_verify_mode.restype = ctypes.c_int
    lib.SSL_CTX_get_verify_mode.argtypes = [ctypes.c_void_p]
    return lib


def _ssl_ctx_pointer(context: Any) -> int:
    """The ``SSL_CTX *`` inside an :class:`ssl.SSLContext`, checked before use."""
    import _ssl

    if sys.implementation.name != "cpython":
        raise NativeTLSUnavailable("only CPython's ssl module layout is known")
    if not isinstance(context, _ssl._SSLContext):
        raise NativeTLSUnavailable("not an ssl.SSLContext")
    lib = _libssl()
    pointer = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
    if not pointer:
        raise NativeTLSUnavailable("SSL context has no OpenSSL context")
    if lib.SSL_CTX_get_options(pointer) != context.options:
        raise NativeTLSUnavailable("SSL context layout is not the one expected")
    if lib.SSL_CTX_get_verify_mode(pointer) != _VERIFY_MODES.get(int(context.verify_mode), -1):
        raise NativeTLSUnavailable("SSL context layout is not the one expected")
    return int(pointer)


def set_groups(context: Any, groups: str) -> None:
    """Restrict the key-exchange groups of ``context`` (OpenSSL names, ``:``-separated)."""
    native = getattr(context, "set_groups", None)
    if native is not None:  # Pythons that have it
        native(groups)
        return
    lib, pointer = _libssl(), _ssl_ctx_pointer(context)
    if lib.SSL_CTX_ctrl(pointer, _SSL_CTRL_SET_GROUPS_LIST, 0, groups.encode("ascii")) != 1:
        raise NativeTLSUnavailable(f"OpenSSL refused the group list {groups!r}")


def disable_session_cache(context: Any) -> None:
    """Turn off OpenSSL's session-id cache on a server ``context``."""
    lib, pointer = _libssl(), _ssl_ctx_pointer(context)
    lib.SSL_CTX_ctrl(pointer, _SSL_CTRL_SET_SESS_CACHE_MODE, _SSL_SESS_CACHE_OFF, None)
    if lib.SSL_CTX_ctrl(pointer, _SSL_CTRL_GET_SESS_CACHE_MODE, 0, None) != _SSL_SESS_CACHE_OFF:
        raise NativeTLSUnavailable("OpenSSL kept its session cache")


def session_cache_mode(context: Any) -> int:
    """The context's session cache mode (0 = off), for checks and tests."""
    lib, pointer = _libssl(), _ssl_ctx_pointer(context)
    return int(lib.SSL_CTX_ctrl(pointer, _SSL_CTRL_GET_SESS_CACHE_MODE, 0, None))

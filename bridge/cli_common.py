"""What every command module shares: the parser that reports usage errors on one line,
reading input files with errors that name the file, JSON output, and argument types.

Commands raise :class:`bridge.errors.BridgeError` subclasses; :func:`bridge.cli.main`
turns them into one line on stderr and the error's exit status.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any, NoReturn

import orjson

from bridge.errors import BridgeError, NotFound, ParseError, UsageError
from bridge.files import read_bounded
from bridge.messages import PROTOCOL_VERSION

FHIR_VERSION = "4.0.1"


def version_text() -> str:
    """``bridge --version``: the package, the FHIR release it speaks, the wire protocol."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        package = version("ws-fhir-bridge")
    except PackageNotFoundError:  # a source tree without an install
        from bridge import __version__ as package
    return f"ws-fhir-bridge {package} (FHIR {FHIR_VERSION}, protocol version {PROTOCOL_VERSION})"


class Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake reported as one line naming the command."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message}; see {self.prog} --help", location=self.prog)


def print_json(obj: Any) -> None:
    sys.stdout.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode() + "\n")


#: The largest file a command reads whole (a record, a consent, a message): far above any
#: real one, and a bound on what a wrong file name (a log, a disk image) costs.
MAX_INPUT_BYTES = 64 * 1024 * 1024


def read_input(path: str | Path, *, what: str = "input file") -> bytes:
    """The bytes of a file the user named, or an error naming the file and what is wrong."""
    file = Path(path)
    try:
        return read_bounded(file, MAX_INPUT_BYTES)
    except UsageError as exc:
        raise UsageError(f"{what}: {exc.message}", location=exc.location) from None
    except FileNotFoundError:
        raise NotFound(f"{what}: no such file", location=str(file)) from None
    except IsADirectoryError:
        raise UsageError(f"{what} is a folder, not a file", location=str(file)) from None
    except PermissionError:
        raise UsageError(f"{what}: permission denied", location=str(file)) from None
    except OSError as exc:
        raise UsageError(
            f"{what}: cannot read ({exc.strerror or type(exc).__name__})", location=str(file)
        ) from None


def read_json(path: str | Path, *, what: str = "input file") -> Any:
    """A JSON document from a file the user named; malformed JSON names the byte."""
    data = read_input(path, what=what)
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ParseError(
            f"{what}: malformed JSON at byte {exc.pos}", location=f"{path}[{exc.pos}]"
        ) from None


def folder_argument(path: str | Path, *, option: str) -> Path:
    """A folder the command may create; refuses a path that names a file."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{option} is not a folder", location=str(folder))
    return folder


def output_folder(path: str | Path, *, option: str) -> Path:
    """A folder the command writes into: made when missing, but only inside a folder that
    exists (a mistyped path grows no tree of folders); a path naming a file is refused."""
    folder = folder_argument(path, option=option)
    if not folder.exists() and not folder.parent.is_dir():
        raise UsageError(f"{option}: the folder to make it in does not exist",
                         location=str(folder.parent))
    return folder


def output_file(path: str | Path, *, option: str) -> Path:
    """A file the command writes (replacing one there): its folder must exist, and the
    path must not name a folder."""
    file = Path(path)
    if file.is_dir():
        raise UsageError(f"{option} is a folder, not a file", location=str(file))
    if not file.parent.is_dir():
        raise UsageError(f"{option}: no such folder", location=str(file.parent))
    return file


def non_negative_int(text: str) -> int:
    """argparse type: an integer of zero or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be zero or more, got {value}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite number of zero or more."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number of zero or more, got {text}")
    return value


#: The longest validity a certificate or CRL is given: a hundred years (a date beyond
#: year 9999 has no X.509 form, and nothing a bridge issues should outlive its operators).
MAX_VALIDITY_DAYS = 36500


def validity_days(text: str) -> int:
    """argparse type: days of validity, zero to :data:`MAX_VALIDITY_DAYS`."""
    value = non_negative_int(text)
    if value > MAX_VALIDITY_DAYS:
        raise argparse.ArgumentTypeError(f"at most {MAX_VALIDITY_DAYS} days (a hundred years)")
    return value


def ip_address(text: str) -> str:
    """argparse type: an IPv4 or IPv6 address, as a certificate names one."""
    import ipaddress

    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IP address: {text!r}") from None


# A host name as RFC 1123 writes one (labels of letters, digits and inner hyphens, at most
# 63 characters each), optionally a wildcard for the leftmost label.
_DNS_NAME = re.compile(
    r"(?:\*\.)?(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
    r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
)


def dns_name(text: str) -> str:
    """argparse type: a DNS name for a certificate (``bridge.example.org``,
    ``*.example.org``), at most 253 characters."""
    if len(text) > 253 or not _DNS_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(f"not a DNS name: {text!r}")
    return text


def add_json_option(parser: argparse.ArgumentParser) -> None:
    """The ``--json`` flag every listing command takes."""
    parser.add_argument(
        "--json", action="store_true", help="machine-readable output: one JSON document"
    )


__all__ = [
    "FHIR_VERSION",
    "PROTOCOL_VERSION",
    "BridgeError",
    "Parser",
    "add_json_option",
    "dns_name",
    "folder_argument",
    "ip_address",
    "non_negative_float",
    "non_negative_int",
    "output_file",
    "output_folder",
    "print_json",
    "read_input",
    "read_json",
    "validity_days",
    "version_text",
]

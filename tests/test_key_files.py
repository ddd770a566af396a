"""Key files made on first use (audit pseudonyms, biometric references): several
processes starting at once on a new controller agree on one key, and none ever goes on
with a key it read while another was still writing it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bridge.errors import ConfigError
from bridge.files import load_or_make_key


def test_a_key_file_another_process_has_created_but_not_yet_written_is_never_used(
        tmp_path: Path) -> None:
    # What a second process saw when the first had created the file (O_EXCL) and not
    # yet written it: an empty key, used without a word, pseudonymised under a key
    # anyone has.
    path = tmp_path / "audit-pseudonym.key"
    path.touch(mode=0o600)
    with pytest.raises(ConfigError) as info:
        load_or_make_key(path, what="audit pseudonym key")
    assert info.value.location == str(path)
    path.write_text("ab" * 16 + "\n")  # half a key
    with pytest.raises(ConfigError):
        load_or_make_key(path, what="audit pseudonym key")


def test_a_new_key_file_appears_whole_with_mode_600(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "audit-pseudonym.key"
    key = load_or_make_key(path)
    assert len(key) == 32 and bytes.fromhex(path.read_text()) == key
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_or_make_key(path) == key
    assert sorted(os.listdir(path.parent)) == ["audit-pseudonym.key"]  # nothing left over


def test_processes_making_the_key_at_once_agree(tmp_path: Path) -> None:
    path = tmp_path / "audit-pseudonym.key"
    pids, reads = [], []
    for n in range(8):
        out = tmp_path / f"read-{n}"
        reads.append(out)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through its file
            try:
                out.write_text(load_or_make_key(path).hex())
            finally:
                os._exit(0)
        pids.append(pid)
    for pid in pids:
        os.waitpid(pid, 0)
    assert {r.read_text() for r in reads} == {path.read_text().strip()}

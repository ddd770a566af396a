"""A restore of an SQLite store stopped at every step of putting its copy in place,
from outside: ``bridge store restore`` killed (SIGKILL) or interrupted (SIGINT, as
Ctrl-C) in a process of its own. The hard case is a store whose log could not be
folded into its file (another reader held it): the log then goes aside with the store
for the moment of the swap. Whatever the step, the store afterwards is either the old
one, with everything it had committed, or the restored one, whole; never a mix."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from compliance_support import audit_entries
from ops_support import bridge
from test_compliance_backup import _committed_and_killed, _hospital_backed_up, _left_aside

from bridge.config import load_config

# Ten restores killed or interrupted in processes of their own: the battery profile.
pytestmark = pytest.mark.battery


def _restore_stopped(config: Path, backup: Path, *, nth: int, sig: int) -> int:
    """Run the restore with the store's log not foldable, sending ``sig`` to itself
    right after the ``nth`` link or rename of the swap (counted from 1), or before the
    first (0); its exit status."""
    code = f"""
import os, signal
import bridge.ledger.backup as backup
real_fold = backup._fold_log
def fold(path, *, required):
    if required:
        return real_fold(path, required=required)
backup._fold_log = fold  # the store's own log stays (another reader held it)
calls = [0]
real_link, real_replace = os.link, os.replace
def counted(real):
    def call(*args, **kwargs):
        if calls[0] == 0 and {nth} == 0:
            os.kill(os.getpid(), {sig})
        done = real(*args, **kwargs)
        calls[0] += 1
        if calls[0] == {nth}:
            os.kill(os.getpid(), {sig})  # SIGINT: raised as the rename returns
        return done
    return call
swap = backup._SqliteRestore._swap
def stopped(self):
    os.link, os.replace = counted(real_link), counted(real_replace)
    try:
        return swap(self)
    finally:
        os.link, os.replace = real_link, real_replace
backup._SqliteRestore._swap = stopped
from bridge.cli import main
raise SystemExit(main(['store', 'restore', '--config', {str(config)!r}, {str(backup)!r}]))
"""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False).returncode


# The swap links the store aside, moves its two log files after it, then renames the
# copy into place: four calls.
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill", "ctrl-c"])
@pytest.mark.parametrize("nth", [0, 1, 2, 3, 4])
def test_a_restore_stopped_while_its_copy_takes_the_place_leaves_one_store_whole(
    tmp_path: Path, nth: int, sig: int
) -> None:
    site, backup = _hospital_backed_up(tmp_path)
    store = load_config(site.hospital).store.path
    _committed_and_killed(store)  # the store holds this entry in its log alone
    status = _restore_stopped(site.hospital, backup, nth=nth, sig=sig)
    assert status in (-9, 130, 0), status
    # Any command may come first; `store status` reads the file without opening it.
    assert bridge("store", "status", "--config", str(site.hospital)).returncode == 0
    actions = [e.record.action for e in audit_entries(site.hospital)]
    if nth < 4:
        assert actions == ["consent.put", "test.committed"], actions  # the old store
    else:
        assert actions == ["consent.put", "store.restore"], actions  # the restored one
    assert _left_aside(site, None) == []
    assert bridge("audit", "verify", "--config", str(site.hospital)).returncode == 0

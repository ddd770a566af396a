"""Review (stop30, minor): ``bridge intake retry`` now loads the audit pseudonym key to
name records (39837bf) with load_or_make_key, before it opens the store: a retry against
a configuration whose store is not there fails ("no store at this path yet") but leaves
a new audit pseudonym key behind. ``bridge intake label`` refuses to make one ("a key made
here would name nothing the bridge wrote"); retry should not make one either.
"""

from __future__ import annotations

from pathlib import Path

from e2e_support import cli


def test_a_refused_retry_makes_no_pseudonym_key(tmp_path: Path) -> None:
    assert cli("init", "hospital", str(tmp_path)).returncode == 0
    key = tmp_path / "hospital-a" / "audit-pseudonym.key"
    assert not key.exists()
    done = cli("intake", "retry", "--config", str(tmp_path / "hospital.toml"), "--all-refused")
    assert done.returncode != 0
    assert "no store" in done.stderr
    assert not key.exists(), "a failed retry made an audit pseudonym key"

"""``bridge inbox export --to DIR`` into a folder that already holds files.

An export writes health data. Each file it leaves is readable by its owner only
(mode 600) whatever was there before under that name, and a name that another user
planted as a symbolic link is replaced, never written through: the export goes to
the folder the operator named and nowhere else.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

from e2e_support import LINK_OUT, consent_for, start_pair

from bridge.samples import inpatient_records


def bridge_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bridge", *args], capture_output=True,
                          text=True, timeout=60, check=False)


async def test_export_over_existing_files_and_planted_links(tmp_path: Path) -> None:
    pair = await start_pair(tmp_path)
    ids = []
    try:
        for i, record in enumerate(inpatient_records(2, seed=97)):
            await pair.hospital.controller.put_consent(consent_for(record, consent_id=f"c-{i}"))
            ids.append((await pair.hospital.submit(record, LINK_OUT)).message_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while (await pair.insurer.controller.db.call(
                pair.insurer.controller.store.inbox_count, "hospital-a")) < len(ids):
            assert loop.time() < deadline
            await asyncio.sleep(0.1)
    finally:
        await pair.hospital.stop()
        await pair.insurer.stop()

    out = tmp_path / "export"
    out.mkdir()
    names = [f"hospital-a_{m.removeprefix('urn:uuid:')}.json" for m in ids]
    # A file left by an earlier tool, world-readable; and a planted link.
    (out / names[0]).write_text("old", encoding="utf-8")
    os.chmod(out / names[0], 0o644)
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text("not yours", encoding="utf-8")
    (out / names[1]).symlink_to(elsewhere)

    run = await asyncio.to_thread(bridge_cli, "inbox", "export", "--config",
                                  str(pair.insurer_cfg), "--to", str(out))
    assert run.returncode == 0, run.stderr
    assert elsewhere.read_text(encoding="utf-8") == "not yours"
    for name, message_id in zip(names, ids, strict=True):
        path = out / name
        assert not path.is_symlink()
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, name
        envelope = json.loads(path.read_bytes())
        assert envelope["messageId"] == message_id
        assert envelope["link"] == "claims-from-hospital-a"  # even with no hand-off row
    assert sorted(p.name for p in out.iterdir()) == sorted(names)  # no temporary left


async def test_pull_out_writes_private_files_and_replaces_planted_links(tmp_path: Path) -> None:
    """``bridge pull --out DIR`` writes a patient's records: the same rules."""
    from pull_support import FROM_LINK, id_card, keep, person_records, pull_consent, start_site

    site = await start_site(tmp_path)
    try:
        records = person_records(1)
        await keep(site, records)
        await site.controller.put_consent(pull_consent(records[0]))
        system, value = id_card(records[0])
        out = tmp_path / "pulled"
        (out / "pages").mkdir(parents=True)
        elsewhere = tmp_path / "elsewhere.json"
        elsewhere.write_text("not yours", encoding="utf-8")
        (out / "pages" / "page-00001.json").symlink_to(elsewhere)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bridge", "pull", "--config", str(site.platform_cfg),
            "--link", FROM_LINK, "--patient", f"{system}|{value}", "--out", str(out),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        _, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
    finally:
        await site.stop()
    assert elsewhere.read_text(encoding="utf-8") == "not yours"
    written = [p for p in out.rglob("*") if p.is_file()]
    assert len(written) > 2
    for path in written:
        assert not path.is_symlink()
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert json.loads((out / "pages" / "page-00001.json").read_bytes())["type"] == "searchset"

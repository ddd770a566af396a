"""Review (stop30): the label key is one process-wide value (header._label_key), set by
every Controller with [mllp] and every MLLPListener. With two bridges in one process
(as tests/intake_support and tests/e2e_support run them) the second one's key names the
first one's sender text: its audit subjects then match neither ``bridge intake label``
for its own configuration nor a restart of it alone. The docstring of use_label_key says
"a process runs one bridge"; nothing enforces or checks it.
"""

from __future__ import annotations

import json
from pathlib import Path

from e2e_support import cli
from hl7_feeds import InpatientVisit
from intake_support import msa, start_intake_pair

APP = "张三 1101011990030745"


def _msh_app(message: bytes, app: str) -> bytes:
    head, _, rest = message.partition(b"\r")
    fields = head.decode("utf-8").split("|")
    fields[2] = app
    return "|".join(fields).encode("utf-8") + b"\r" + rest


async def test_first_bridge_labels_match_its_own_key(tmp_path: Path) -> None:
    first = await start_intake_pair(tmp_path / "a", tls=False, start_insurer=False)
    second = None
    try:
        second = await start_intake_pair(tmp_path / "b", tls=False, start_insurer=False)
        [ack] = await first.send([_msh_app(InpatientVisit().a01(), APP)])
        assert msa(ack)[1] == "AA"
        [entry] = [e.record for e in first.hospital.controller.store.audit_entries()
                   if e.record.action == "hl7.receive"]
        config = first.hospital.controller.config.source
        done = cli("intake", "label", "--config", str(config), "--json", APP)
        assert done.returncode == 0, done.stderr
        label = json.loads(done.stdout)[0]["label"]
        assert entry.subject.startswith(f"hl7:{label}|"), (entry.subject, label)
    finally:
        if second is not None:
            await second.stop()
        await first.stop()

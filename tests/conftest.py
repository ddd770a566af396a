"""Test-suite settings shared by every test module."""

from __future__ import annotations

import os
from typing import Any

from hypothesis import settings

# Records which tests prove which GB/T 39725 Appendix F items, and whether they passed,
# for `bridge compliance report` (tests/compliance_evidence.py).
pytest_plugins = ["compliance_evidence"]

# In CI the property tests run with a fixed seed, so a run is reproducible and a red
# build always means the same counterexample; locally they explore new examples
# every run. Neither has a deadline: the machine is shared and timing is noisy.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


if os.environ.get("BRIDGE_EVENT_LOOP", "").lower() == "uvloop":
    # The in-process bridges of the tests run on uvloop too; the ``bridge serve``
    # processes the tests start inherit the variable and run on it as well.

    def pytest_asyncio_loop_factories(config: Any, item: Any) -> dict[str, Any]:
        import uvloop

        return {"uvloop": uvloop.new_event_loop}

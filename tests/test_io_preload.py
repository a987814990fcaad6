"""A fresh process's first load can be cancelled while the readers' imports run (issue 8).

Runs in a child process, so the imports really are first-time ones.
"""

from __future__ import annotations

from pathlib import Path


def test_first_load_cancels_while_imports_run(embedded_bundle: Path) -> None:
    from napari_sigmma.bench.cancel import time_cold_load

    out = time_cold_load(embedded_bundle)
    assert out["fresh_process"]
    assert out["outcome"] == "cancelled" and out["thread_gone"]
    # the load ended before the imports did: it did not wait for them
    assert not out["imports_done_when_task_ended"]
    assert out["imports_went_on_s"] > 0
    # and the next load works
    assert out["next_load_tables"] == ["table"]

"""Two processes writing to the same database at the same time lose nothing and fail nothing."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Callable

from store import Store

N = 200


def test_two_processes_writing_at_once(
    tmp_path: Path, store: Store, store_url: str, spawn: Callable[..., "subprocess.Popen[str]"]
) -> None:
    go = tmp_path / "go"
    writers = [spawn(store_url, "write", str(go), str(N), f"writer{i}") for i in range(2)]
    for writer in writers:  # both processes up and connected before either starts writing
        assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
    go.touch()
    for writer in writers:
        out, err = writer.communicate(timeout=60)
        assert writer.returncode == 0, err
        assert "Traceback" not in err and "locked" not in err
    # every example and interaction of both writers, and each shared question exactly once
    assert store.count_examples() == 2 * N + N // 4
    inputs = {e.input for e in store.list_examples()}
    assert all(f"writer{w} question {i}" in inputs for w in range(2) for i in range(N))
    assert sum(1 for text in inputs if text.startswith("shared")) == N // 4
    assert store.stats()["interactions"]["total"] == 2 * N
    assert store.stats()["interactions"]["tokens_system2"] == 2 * N * 3
    # and the writes really were concurrent: the two writers' time spans overlap
    spans = []
    for w in range(2):
        times = [r.created_at for r in store.list_interactions(limit=None) if r.input.startswith(f"writer{w} ")]
        spans.append((min(times), max(times)))
    assert spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1]

"""The public surface of ``store`` and what it must not pull in."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import store

REPO = Path(__file__).resolve().parents[2]


def test_public_surface_is_curated() -> None:
    assert set(store.__all__) == {
        "SCHEMA_VERSION", "Adapter", "AdapterStatus", "ConsolidationRun", "Example", "ExampleKind",
        "ExampleStatus", "ImportValidationError", "Interaction", "Lock", "Meta", "Route", "RunStatus",
        "SchemaVersionError", "Store", "StoreError",
    }  # fmt: skip
    for name in store.__all__:
        assert getattr(store, name) is not None
    assert issubclass(store.SchemaVersionError, store.StoreError)
    assert issubclass(store.ImportValidationError, store.StoreError)


def test_store_imports_no_model_agent_or_policy_code() -> None:
    code = (
        "import sys, store; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'transformers', 'agent', 'policies'}); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)

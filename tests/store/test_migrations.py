"""Schema versions: an older database is upgraded in one transaction with its data kept."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text

from store import SCHEMA_VERSION, Store, StoreError
from store.db import configure_sqlite
from store.migrations import MIGRATIONS, Migration, ensure_schema, read_version

# The schema as s2agent version 1 wrote it, frozen here as the raw SQL an old database file contains.
V1_SCHEMA = """
CREATE TABLE interactions (
    id INTEGER PRIMARY KEY, created_at DATETIME NOT NULL, input TEXT NOT NULL, tag VARCHAR(128),
    route VARCHAR(16) NOT NULL, system1_answer TEXT, confidence FLOAT, final_answer TEXT NOT NULL,
    method VARCHAR(32), adapter_version INTEGER, tokens_system1 INTEGER NOT NULL, tokens_system2 INTEGER NOT NULL,
    system2_calls INTEGER NOT NULL, latency_ms FLOAT NOT NULL, route_reason JSON, votes JSON, accepted BOOLEAN
);
CREATE TABLE examples (
    id INTEGER PRIMARY KEY, input TEXT NOT NULL, target TEXT NOT NULL, method VARCHAR(32), votes JSON,
    agreement FLOAT, status VARCHAR(16) NOT NULL, tag VARCHAR(128), dedup_key VARCHAR(64) NOT NULL UNIQUE,
    interaction_id INTEGER REFERENCES interactions (id) ON DELETE SET NULL, adapter_version INTEGER,
    created_at DATETIME NOT NULL, updated_at DATETIME NOT NULL
);
CREATE TABLE adapters (
    version INTEGER PRIMARY KEY, path TEXT NOT NULL, parent INTEGER, scope VARCHAR(128),
    status VARCHAR(16) NOT NULL, serving BOOLEAN NOT NULL, metrics JSON NOT NULL, n_train INTEGER NOT NULL,
    run_id INTEGER, created_at DATETIME NOT NULL, promoted_at DATETIME
);
CREATE TABLE consolidation_runs (
    id INTEGER PRIMARY KEY, started_at DATETIME NOT NULL, finished_at DATETIME, status VARCHAR(16) NOT NULL,
    pid INTEGER, host VARCHAR(255), scope VARCHAR(128), n_train INTEGER NOT NULL, n_holdout INTEGER NOT NULL,
    metrics JSON, adapter_version INTEGER, reason TEXT, config JSON
);
CREATE TABLE locks (
    name VARCHAR(128) PRIMARY KEY, owner VARCHAR(255) NOT NULL, pid INTEGER NOT NULL, host VARCHAR(255) NOT NULL,
    acquired_at DATETIME NOT NULL, heartbeat_at DATETIME NOT NULL
);
CREATE TABLE meta (key VARCHAR(64) PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta VALUES ('schema_version', '1');
INSERT INTO interactions VALUES (1, '2025-01-02 03:04:05.000000', 'What is 2+2?', 'math', 'system2', '5', 0.2,
    '4', 'cot', NULL, 10, 200, 5, 812.5, '{"estimator": "mean_logprob", "score": 0.2, "threshold": 0.5}',
    '{"4": 4, "5": 1}', 1);
INSERT INTO examples VALUES (1, 'What is 2+2?', '4', 'cot', '{"4": 4, "5": 1}', 0.8, 'used', 'math',
    'k1', 1, 1, '2025-01-02 03:04:05.000000', '2025-01-03 00:00:00.000000');
INSERT INTO adapters VALUES (1, '/adapters/v1', NULL, NULL, 'promoted', 1, '{"acc": 0.7}', 1, 1,
    '2025-01-03 00:00:00.000000', '2025-01-03 00:10:00.000000');
"""


def _write_v1(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.executescript(V1_SCHEMA)
    conn.commit()
    conn.close()


def _columns(url: str) -> dict[str, set[str]]:
    engine = create_engine(url)
    inspector = inspect(engine)
    columns = {t: {c["name"] for c in inspector.get_columns(t)} for t in inspector.get_table_names()}
    engine.dispose()
    return columns


def test_versions_form_a_chain_up_to_the_current_one() -> None:
    assert [m.from_version for m in MIGRATIONS] == list(range(1, SCHEMA_VERSION))


def test_v1_database_is_upgraded_with_data_kept(tmp_path: Path) -> None:
    old, fresh = tmp_path / "old.db", tmp_path / "fresh.db"
    _write_v1(old)
    store = Store(old)
    with store.engine.connect() as conn:
        assert read_version(conn) == SCHEMA_VERSION
    [interaction] = store.list_interactions()
    assert (interaction.input, interaction.final_answer, interaction.error) == ("What is 2+2?", "4", None)
    assert interaction.route_reason == {"estimator": "mean_logprob", "score": 0.2, "threshold": 0.5}
    assert interaction.accepted is True and interaction.created_at.tzinfo is not None
    [example] = store.list_examples()
    assert (example.target, example.status, example.kind, example.votes) == ("4", "used", "system2", {"4": 4, "5": 1})
    adapter = store.serving_adapter()
    assert adapter is not None and adapter.version == 1 and adapter.files_deleted is False
    assert adapter.needs_retrain is False and example.source is None and interaction.source is None  # v3
    # The upgraded database works like a new one, and has the same columns.
    store.add_example("What is 3+3?", "6", method="cot", kind="retention")
    store.close()
    Store(fresh).close()
    assert _columns(f"sqlite:///{old}") == _columns(f"sqlite:///{fresh}")


def test_failed_upgrade_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    _write_v1(path)
    boom = StoreError("step 3 -> 4 failed half way")

    def half_done_then_fail(conn) -> None:  # type: ignore[no-untyped-def]
        conn.execute(text("ALTER TABLE examples ADD COLUMN half_done TEXT"))
        raise boom

    steps = [*MIGRATIONS, Migration(SCHEMA_VERSION, "a step that fails", half_done_then_fail)]
    engine = create_engine(f"sqlite:///{path}")
    configure_sqlite(engine)  # SQLAlchemy emits BEGIN, so DDL is transactional on SQLite too
    with pytest.raises(StoreError, match="half way"):
        with engine.begin() as conn:
            ensure_schema(conn, str(path), target=SCHEMA_VERSION + 1, steps=steps)
    with engine.connect() as conn:
        assert read_version(conn) == 1
        columns = {c["name"] for c in inspect(conn).get_columns("examples")}
    assert "half_done" not in columns and "kind" not in columns
    engine.dispose()


def test_missing_step_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    _write_v1(path)
    engine = create_engine(f"sqlite:///{path}")
    configure_sqlite(engine)
    with pytest.raises(StoreError, match=f"no upgrade step from schema version {SCHEMA_VERSION} to {SCHEMA_VERSION + 1}"):
        with engine.begin() as conn:
            ensure_schema(conn, str(path), target=SCHEMA_VERSION + 1)
    with engine.connect() as conn:
        assert read_version(conn) == 1  # the steps that did run (1 -> 2 -> ...) were rolled back too
    engine.dispose()

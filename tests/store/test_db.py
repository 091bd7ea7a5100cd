"""Opening databases: URLs and paths, SQLite settings, and the files the store must refuse untouched."""

from __future__ import annotations

import sqlite3
import sys
from datetime import timezone
from pathlib import Path

import pytest
from sqlalchemy import make_url, text

from store import SCHEMA_VERSION, SchemaVersionError, Store, StoreError
from store.db import resolve_url
from tests.conftest import fresh_postgres_database


def test_plain_path_creates_parent_folders_and_schema(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "agent.db"
    store = Store(path)
    assert store.url == f"sqlite:///{path}"
    assert path.is_file()
    store.close()
    with sqlite3.connect(path) as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
    assert {"interactions", "examples", "adapters", "consolidation_runs", "locks", "meta"} <= tables
    assert int(version) == SCHEMA_VERSION


def test_reopen_keeps_data(store_url: str) -> None:
    with Store(store_url) as first:
        first.add_example("What is 2+2?", "4", method="cot")
    with Store(store_url) as second:
        assert [e.target for e in second.list_examples()] == ["4"]


def test_sqlite_pragmas_on_every_connection(sqlite_path: Path) -> None:
    store = Store(sqlite_path)
    for _ in range(2):  # two pooled connections, both configured
        with store.engine.connect() as a, store.engine.connect() as b:
            for conn in (a, b):
                assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
                assert conn.execute(text("PRAGMA busy_timeout")).scalar() == 30000
                assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
                assert conn.execute(text("PRAGMA synchronous")).scalar() == 1  # NORMAL
    store.close()


def test_times_are_timezone_aware_utc(store: Store) -> None:
    store.log_interaction(input="q", route="system1", final_answer="a")
    example, _ = store.add_example("q", "a", method="cot")
    for moment in (store.list_interactions()[0].created_at, store.get_example(example.id).created_at):
        assert moment.tzinfo is not None and moment.utcoffset() == timezone.utc.utcoffset(None)


def test_text_file_is_refused_and_left_byte_identical(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    path.write_bytes(b"these are my notes, not a database\n" * 100)
    before = path.read_bytes()
    with pytest.raises(StoreError, match="is not a SQLite database"):
        Store(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.db"]  # no -wal / -shm left behind


def test_newer_schema_is_refused_and_left_byte_identical(sqlite_path: Path) -> None:
    with sqlite3.connect(sqlite_path) as conn:
        conn.execute("CREATE TABLE meta (key VARCHAR(64) PRIMARY KEY, value TEXT NOT NULL)")
        conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION + 1),))
        conn.execute("CREATE TABLE examples (id INTEGER PRIMARY KEY, future_column TEXT)")
    conn.close()
    before = sqlite_path.read_bytes()
    with pytest.raises(SchemaVersionError, match=rf"schema version {SCHEMA_VERSION + 1}.*newer s2agent") as info:
        Store(sqlite_path)
    assert (info.value.found, info.value.supported) == (SCHEMA_VERSION + 1, SCHEMA_VERSION)
    assert sqlite_path.read_bytes() == before
    assert sorted(p.name for p in sqlite_path.parent.iterdir()) == ["agent.db"]


def test_newer_schema_is_refused_on_any_backend(store_url: str) -> None:
    with Store(store_url) as store:
        with store.engine.begin() as conn:
            conn.execute(text("UPDATE meta SET value = '999' WHERE key = 'schema_version'"))
        store.add_example("kept", "yes", method="cot")
    with pytest.raises(SchemaVersionError, match="999"):
        Store(store_url)


def test_foreign_sqlite_database_is_refused(sqlite_path: Path) -> None:
    with sqlite3.connect(sqlite_path) as conn:
        conn.execute("CREATE TABLE photos (id INTEGER PRIMARY KEY)")
    conn.close()
    with pytest.raises(StoreError, match="not an s2agent database"):
        Store(sqlite_path)


def test_parent_that_is_a_file_gives_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    target = blocker / "sub" / "agent.db"
    with pytest.raises(StoreError, match="cannot create the folder") as info:
        Store(target)
    assert str(target) in str(info.value)


def test_directory_is_not_a_database(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="is a directory"):
        Store(tmp_path)


def test_bad_url_gives_a_store_error() -> None:
    with pytest.raises(StoreError, match="cannot use the database URL"):
        Store("nosuchdialect://host/db")


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgresql://user:pass@db.example/agent", "postgresql+psycopg://user:pass@db.example/agent"),
        ("postgres://user@db.example:5433/agent?sslmode=require", "postgresql+psycopg://user@db.example:5433/agent?sslmode=require"),
        ("postgresql+psycopg2://user@db.example/agent", "postgresql+psycopg2://user@db.example/agent"),
        ("postgresql+psycopg://user@db.example/agent", "postgresql+psycopg://user@db.example/agent"),
        ("sqlite:////tmp/agent.db", "sqlite:////tmp/agent.db"),
    ],
)
def test_plain_postgresql_urls_get_the_psycopg3_driver(given: str, expected: str) -> None:
    """SQLAlchemy 2.0 (which pyproject allows) defaults ``postgresql://`` to psycopg2, which the ``postgres``
    extra does not install; 2.1 defaults to psycopg 3. The store picks psycopg 3 on either."""
    assert resolve_url(given) == expected


def test_plain_postgresql_url_opens_through_psycopg3() -> None:
    with fresh_postgres_database() as url:
        plain = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        with Store(plain) as store:
            assert store.engine.dialect.name == "postgresql" and store.engine.dialect.driver == "psycopg"
            store.add_example("What is 2+2?", "4", method="cot")
            assert [e.target for e in store.list_examples()] == ["4"]


def test_missing_postgresql_driver_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if the `postgres` extra were not installed
    with pytest.raises(StoreError, match=r"s2agent\[postgres\]"):
        Store("postgresql://user@127.0.0.1:1/agent")

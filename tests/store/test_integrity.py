"""Damaged, full, read-only and locked databases, on real files: each reported as what it is, none written to.

The damaged file is made the way it happens: a store with rows, then bytes overwritten in its middle pages,
so the header is valid and the file opens. The read-only folder is real (``chmod`` for a normal user; for
root, which ignores permissions, the immutable flag); the full disk is a small tmpfs in a private mount
namespace where the host allows one, and SQLite's own page limit everywhere (the same SQLITE_FULL).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import event, make_url, text

from store import (
    SCHEMA_VERSION,
    Store,
    StoreBusy,
    StoreCorrupt,
    StoreError,
    StoreFull,
    StoreReadOnly,
    check_database,
)
from store.integrity import sqlite_problems
from tests.conftest import fresh_postgres_database

REPO = Path(__file__).resolve().parents[2]
MISTAKEN_FOR_DAMAGE = ("corrupt", "not a SQLite database", "is damaged", ".recover")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def database_with_rows(path: Path, rows: int = 300) -> Path:
    """A store with ``rows`` examples, everything checkpointed into the main file."""
    with Store(path) as store:
        for i in range(rows):
            store.add_example(f"question {i} " + "x" * 200, f"answer {i}", method="cot", agreement=1.0)
    with sqlite3.connect(path) as conn:  # everything into the main file, so the damage is all there is
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return path


def overwrite_middle_pages(path: Path) -> Path:
    """Overwrite most of the pages between 45 % and 60 % of the file: a valid header, broken b-trees."""
    pages = path.stat().st_size // 4096
    with open(path, "r+b") as f:
        for page in range(int(pages * 0.45), int(pages * 0.6)):
            f.seek(page * 4096 + 100)
            f.write(b"\xff" * 3000)
    with sqlite3.connect(path) as conn:
        assert sqlite_problems(conn), "the overwritten pages should fail quick_check"
    conn.close()
    return path


def damaged_database(path: Path, rows: int = 300) -> Path:
    """A store with rows whose middle pages were then overwritten, as a disk or a stray write leaves one."""
    return overwrite_middle_pages(database_with_rows(path, rows))


@pytest.fixture
def damaged(tmp_path: Path) -> Path:
    return damaged_database(tmp_path / "agent.db")


# --- a damaged file --------------------------------------------------------------------------------------------
def test_a_verifying_open_refuses_a_damaged_file_untouched(damaged: Path) -> None:
    before = digest(damaged)
    with pytest.raises(StoreCorrupt) as info:
        Store(damaged, verify=True)
    message = str(info.value)
    assert f"{damaged} is damaged (PRAGMA quick_check:" in message
    assert "will not write to it" in message and f"sqlite3 {damaged} .recover" in message and ".bak" in message
    assert digest(damaged) == before


def test_once_damage_is_seen_no_write_reaches_the_file(damaged: Path) -> None:
    store = Store(damaged)  # without the check it opens, as it did before
    with pytest.raises(StoreCorrupt, match="is damaged"):
        store.stats()  # reads a damaged page: one clear error, not the driver's
    assert store.damaged is not None and "is damaged" in store.damaged
    before = digest(damaged)
    with pytest.raises(StoreCorrupt, match="will not write to it"):
        store.add_example("a new row", "into a damaged file", method="cot")
    store.close()
    assert digest(damaged) == before


def test_verify_later_finds_the_damage_and_stops_writes(damaged: Path) -> None:
    store = Store(damaged)
    with pytest.raises(StoreCorrupt, match="PRAGMA quick_check"):
        store.verify()
    before = digest(damaged)
    with pytest.raises(StoreCorrupt):
        store.log_interaction(input="q", route="system1", final_answer="a")
    store.close()
    assert digest(damaged) == before


def test_check_database_lists_problems_without_writing(damaged: Path) -> None:
    before = digest(damaged)
    report = check_database(damaged)
    assert not report.ok and report.backend == "sqlite" and report.problems
    assert ".recover" in report.advice
    quick = check_database(damaged, full=False)
    assert not quick.ok
    assert digest(damaged) == before


def test_check_database_on_a_text_file(tmp_path: Path) -> None:
    notes = tmp_path / "notes.db"
    notes.write_text("not a database\n" * 100)
    report = check_database(notes)
    assert not report.ok and "not a database" in report.problems[0]
    with pytest.raises(StoreError, match="no database at"):
        check_database(tmp_path / "missing.db")


def test_check_database_on_a_healthy_store(store_url: str) -> None:
    with Store(store_url) as store:
        store.add_example("What is 2+2?", "4", method="cot")
    report = check_database(store_url)
    assert report.ok and report.problems == [] and report.schema_version == SCHEMA_VERSION
    if make_url(store_url).get_backend_name() == "postgresql":
        assert report.backend == "postgresql"


def test_check_database_refuses_to_guess_about_an_unreachable_server() -> None:
    with pytest.raises(StoreError, match="cannot be reached|cannot reach"):
        check_database("postgresql://nobody:secret@127.0.0.1:1/none?connect_timeout=2")


# --- a read-only folder ----------------------------------------------------------------------------------------
@pytest.fixture
def read_only_folder(tmp_path: Path) -> Iterator[Path]:
    """A folder holding a healthy store that this process cannot write to (no -wal or -shm can be created)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    with Store(folder / "agent.db") as store:
        store.add_example("kept", "yes", method="cot")
    if os.geteuid() != 0:
        folder.chmod(0o555)
        undo = ["chmod", "755", str(folder)]
    else:  # root ignores permissions; the immutable flag stops it (ext4, xfs, btrfs...)
        if not shutil.which("chattr") or subprocess.run(["chattr", "+i", str(folder)], capture_output=True, check=False).returncode:
            pytest.skip("running as root and cannot set the immutable flag here: no way to make a folder read-only")
        undo = ["chattr", "-i", str(folder)]
    try:
        yield folder
    finally:
        subprocess.run(undo, check=True)


def test_a_read_only_folder_is_reported_as_read_only(read_only_folder: Path) -> None:
    path = read_only_folder / "agent.db"
    before = digest(path)
    for verify in (False, True):
        with pytest.raises(StoreReadOnly) as info:
            Store(path, verify=verify)
        message = str(info.value)
        assert "read-only" in message and "do not delete it" in message
        assert not any(word in message for word in MISTAKEN_FOR_DAMAGE), message
    assert digest(path) == before


# --- a full disk -----------------------------------------------------------------------------------------------
def test_sqlite_full_is_reported_as_a_full_disk(sqlite_path: Path) -> None:
    store = Store(sqlite_path)
    store.add_example("small", "row", method="cot")
    store.engine.dispose()

    @event.listens_for(store.engine, "connect")
    def _cap(dbapi_connection, _record) -> None:  # SQLite's own limit: the same SQLITE_FULL as a full disk
        dbapi_connection.execute("PRAGMA max_page_count = 40")

    with pytest.raises(StoreFull) as info:
        store.add_example("big " + "x" * 400_000, "row", method="cot")
    message = str(info.value)
    assert "full" in message and "intact" in message
    assert not any(word in message for word in MISTAKEN_FOR_DAMAGE), message
    store.add_example("another small", "row", method="cot")  # a full disk does not mark the file damaged
    assert store.count_examples() == 2
    store.close()


FILL_A_TMPFS = textwrap.dedent("""
    import sys
    from store import Store, StoreError
    store = Store(sys.argv[1] + "/agent.db")
    try:
        for i in range(10_000):
            store.add_example(f"row {i} " + "x" * 8000, str(i), method="cot")
    except StoreError as exc:
        print(type(exc).__name__, exc, sep="\\n")
""")


def test_a_really_full_disk_is_reported_as_full(tmp_path: Path) -> None:
    """A 512 KB tmpfs, mounted in a mount namespace of the child only (needs root or user namespaces)."""
    mount = tmp_path / "small"
    mount.mkdir()
    shell = f'mount -t tmpfs -o size=512k tmpfs "{mount}" && exec "{sys.executable}" -c "$0" "{mount}"'
    if not shutil.which("unshare"):
        pytest.skip("no unshare(1) here")
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", f'mount -t tmpfs tmpfs "{mount}"'],
                           capture_output=True, check=False)
    if probe.returncode:
        pytest.skip(f"cannot mount a tmpfs in a private mount namespace here: {probe.stderr.decode().strip()}")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", shell, FILL_A_TMPFS],
                          capture_output=True, text=True, env=env, timeout=120, check=False)
    kind, _, message = done.stdout.partition("\n")
    assert kind == "StoreFull", done.stdout + done.stderr
    assert "full" in message and not any(word in message for word in MISTAKEN_FOR_DAMAGE), message


# --- a lock held too long --------------------------------------------------------------------------------------
def test_database_is_locked_becomes_store_busy(sqlite_path: Path) -> None:
    store = Store(sqlite_path)
    store.engine.dispose()

    @event.listens_for(store.engine, "connect")
    def _impatient(dbapi_connection, _record) -> None:  # runs after the store's 30 s: wait 0.1 s instead
        dbapi_connection.execute("PRAGMA busy_timeout = 100")

    holder = sqlite3.connect(sqlite_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another writer holds the write lock
    try:
        with pytest.raises(StoreBusy, match="busy.*retry later"):
            store.add_example("waiting", "row", method="cot")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    store.add_example("after", "row", method="cot")  # busy is not damage: the store writes once the lock is free
    store.close()


# --- PostgreSQL ------------------------------------------------------------------------------------------------
def test_a_read_only_postgresql_database_is_reported_as_read_only() -> None:
    with fresh_postgres_database() as url:
        with Store(url) as store:
            store.add_example("kept", "yes", method="cot")
            name = make_url(url).database
            with store.engine.connect() as conn:
                conn.execute(text(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on'))
                conn.commit()
        with Store(url) as store:  # new connections start read-only
            with pytest.raises(StoreReadOnly, match="do not delete it"):
                store.add_example("refused", "row", method="cot")
            assert store.count_examples() == 1

"""Fixtures for the store tests: the same tests run on a real SQLite file and, when
``S2AGENT_TEST_POSTGRES_URL`` is set, on PostgreSQL (each test gets a fresh database there; see
``tests/conftest.py``: without the variable they skip, on CI they fail)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from store import Store  # noqa: E402
from tests.conftest import fresh_postgres_database  # noqa: E402

WORKER = Path(__file__).with_name("_worker.py")


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL to an empty database of each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'agent.db'}"
        return
    with fresh_postgres_database() as url:
        yield url


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    """An open store on an empty database."""
    s = Store(store_url)
    yield s
    s.close()


@pytest.fixture
def sqlite_path(tmp_path: Path) -> Path:
    """Where a SQLite-only test keeps its database."""
    return tmp_path / "agent.db"


def _spawn(*args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return subprocess.Popen(
        [sys.executable, str(WORKER), *args],
        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start ``_worker.py URL MODE ...`` in a fresh interpreter of this venv: a real second process."""
    started: list[subprocess.Popen[str]] = []

    def start(*args: str) -> subprocess.Popen[str]:
        started.append(_spawn(*args))
        return started[-1]

    yield start
    for proc in started:  # only the processes this test started
        if proc.poll() is None:
            proc.kill()
        proc.wait()

"""Persistence for s2agent: what was asked, what System 1 should learn, which adapter serves.

SQLAlchemy 2.0 over SQLite (default, WAL) or PostgreSQL by URL; no model or server code is imported here.

    from store import Store
    store = Store("~/.s2agent/agent.db")
    example, created = store.add_example("2+2?", "4", method="cot", agreement=1.0)
"""

from .check import CheckReport, check_database
from .core import Store
from .errors import (
    ImportValidationError,
    SchemaVersionError,
    StoreBusy,
    StoreCorrupt,
    StoreError,
    StoreFull,
    StoreReadOnly,
    StoreUnavailable,
)
from .schema import (
    SCHEMA_VERSION,
    Adapter,
    AdapterStatus,
    ConsolidationRun,
    Example,
    ExampleKind,
    ExampleStatus,
    Interaction,
    Lock,
    Meta,
    Route,
    RunStatus,
)
from .sources import PurgeReport

__all__ = [
    "SCHEMA_VERSION",
    "Adapter",
    "AdapterStatus",
    "CheckReport",
    "ConsolidationRun",
    "Example",
    "ExampleKind",
    "ExampleStatus",
    "ImportValidationError",
    "Interaction",
    "Lock",
    "Meta",
    "PurgeReport",
    "Route",
    "RunStatus",
    "SchemaVersionError",
    "Store",
    "StoreBusy",
    "StoreCorrupt",
    "StoreError",
    "StoreFull",
    "StoreReadOnly",
    "StoreUnavailable",
    "check_database",
]

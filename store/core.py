"""``Store``: the one object the runtime talks to for everything it keeps on disk.

Each concern lives in its own module as a mixin on :class:`store.db.StoreBase` (which owns the engine and
sessions); this class only puts them together. One ``Store`` is safe to share between threads, and any
number of processes may open the same database at once.
"""

from __future__ import annotations

from .adapter_files import AdapterFilesMixin
from .adapters import AdaptersMixin
from .buffer import BufferMixin
from .interactions import InteractionsMixin
from .runs import RunsMixin
from .scopes import ScopesMixin
from .sources import SourcesMixin


class Store(InteractionsMixin, BufferMixin, AdaptersMixin, AdapterFilesMixin, RunsMixin, ScopesMixin, SourcesMixin):
    """The s2agent database: interactions, the distillation buffer, adapters (and their files), consolidation runs,
    locks, sources.

    ``Store("agent.db")`` opens (creating folders and the schema if needed, upgrading an older schema) a
    SQLite file; ``Store("postgresql+psycopg://...")`` any SQLAlchemy URL. Every row it returns is detached
    and stays readable after the call. Problems come back as :class:`store.StoreError` with one clear message.
    """

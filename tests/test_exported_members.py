"""Each package's ``__all__`` is its real public surface: every listed name exists, every public name is listed.

A name a package's ``__init__`` defines or re-exports without listing it is public by accident (it leaks
into ``from package import *`` users' code and into docs); a listed name that does not exist breaks
``import *``. Submodules are not part of the comparison: they become attributes of a package whenever
anything imports them. Any other module an ``__init__`` imports under a public name is counted, as httpx's
``tests/test_exported_members.py`` counts it.
"""

from __future__ import annotations
import __future__

import importlib
import types

import pytest

PACKAGES = ["agent", "store", "policies.system2"]


def public_members(package: types.ModuleType) -> set[str]:
    """What ``package`` binds under a public name, other than its own submodules and ``from __future__`` flags."""

    def own_submodule(value: object) -> bool:
        return isinstance(value, types.ModuleType) and value.__name__.startswith(package.__name__ + ".")

    return {
        name
        for name, value in vars(package).items()
        if not name.startswith("_") and not own_submodule(value) and not isinstance(value, __future__._Feature)
    }


@pytest.mark.parametrize("name", PACKAGES)
def test_all_lists_exactly_the_public_members(name: str) -> None:
    package = importlib.import_module(name)
    listed = list(package.__all__)
    assert len(listed) == len(set(listed)), f"{name}.__all__ lists a name twice"
    assert [n for n in listed if not hasattr(package, n)] == [], f"{name}.__all__ lists names it lacks"
    assert sorted(public_members(package) - set(listed)) == [], f"{name} exports names __all__ does not list"


@pytest.mark.parametrize("name", PACKAGES)
def test_star_import_gives_the_listed_names(name: str) -> None:
    namespace: dict[str, object] = {}
    exec(f"from {name} import *", namespace)  # noqa: S102 - the statement users write
    assert set(namespace) - {"__builtins__"} == set(importlib.import_module(name).__all__)


def test_every_error_the_store_exports_is_a_store_error() -> None:
    """``except StoreError`` is how the CLI and the server catch every problem the store names."""
    import store

    errors = [v for v in (getattr(store, n) for n in store.__all__) if isinstance(v, type) and issubclass(v, Exception)]
    assert store.StoreError in errors and len(errors) > 1
    assert [e.__name__ for e in errors if not issubclass(e, store.StoreError)] == []


def test_the_comparison_catches_an_unlisted_and_a_missing_name() -> None:
    """The check above is not vacuous: a stray public name and a phantom ``__all__`` entry are both seen."""
    fake = types.ModuleType("fake")
    exec("from __future__ import annotations\nimport json\nfrom json import dumps\nX = 1\n_y = 2", fake.__dict__)
    fake.__all__ = ["X", "Missing"]
    fake.sub = types.ModuleType("fake.sub")  # what importing fake.sub does to fake
    assert public_members(fake) == {"json", "dumps", "X"}
    assert [n for n in fake.__all__ if not hasattr(fake, n)] == ["Missing"]

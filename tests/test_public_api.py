"""The public API: each stage's package (and ``certify`` itself) lists in ``__all__`` the
names a user imports; every one of them exists and says what it is, and no name hides a
module of the same package (``from certify.radii import witness`` must stay the module)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import certify

PACKAGES = ["certify", *(f"certify.{m.name}" for m in pkgutil.iter_modules(certify.__path__)
                         if m.ispkg)]


def test_every_stage_has_a_public_api():
    assert set(PACKAGES) == {"certify", *(f"certify.{s}" for s in (
        "closed_forms", "graph", "formats", "capture", "bounds", "radii", "certificate",
        "check", "attacks", "models", "testing", "cli"))}


@pytest.mark.parametrize("name", PACKAGES)
def test_every_public_name_is_documented(name):
    package = importlib.import_module(name)
    assert package.__doc__ and len(set(package.__all__)) == len(package.__all__)
    for public in package.__all__:
        value = getattr(package, public)
        if inspect.isclass(value) or inspect.isfunction(value):
            doc = inspect.getdoc(value) or ""
            # a dataclass without a docstring gets its signature as one
            assert doc and not doc.startswith(f"{value.__name__}("), f"{name}.{public}"


@pytest.mark.parametrize("name", PACKAGES)
def test_no_public_name_hides_a_module(name):
    package = importlib.import_module(name)
    modules = {m.name for m in pkgutil.iter_modules(package.__path__)}
    assert modules.isdisjoint(package.__all__)

"""A pytest plugin under which ``import bgflow`` gives the built-in host (``-p bgflow_on_host``).

For running bgflow's own test suite against :mod:`bgflow_gate.host`
(``tests/test_bgflow_suite_on_host.py``).  ``bgflow`` and every submodule a test imports
(``bgflow.distribution``, ``bgflow.nn.flow.coupling``, ...) are one flat namespace holding
the host's public names; ``bgflow.utils`` adds the names of :mod:`bgflow_gate.host.utils`.
A name the host does not claim (say ``TruncatedNormalDistribution``) imports as a
placeholder that raises :class:`NotClaimedError` when it is used, so a test fails on its
own instead of taking the whole file with it, and the failure says why.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types

import pytest

from bgflow_gate import host


class NotClaimedError(NotImplementedError):
    """The test used a bgflow name that the built-in host does not claim."""


class _NotClaimed:
    """Stands in for a bgflow name the host lacks; calling it raises :class:`NotClaimedError`.

    Its attributes are the host's names (``bgflow.nn.flow.SplitFlow`` reached through an
    attribute, not an import, is the host's) or further placeholders.
    """

    def __init__(self, name: str):
        self._name = name

    def _fail(self, *args, **kwargs):
        raise NotClaimedError(f"bgflow.{self._name} is not part of the built-in host")

    __call__ = _fail

    def __getattr__(self, attribute: str):
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        names = _host_names("bgflow")
        return names[attribute] if attribute in names else _NotClaimed(f"{self._name}.{attribute}")

    def __mro_entries__(self, bases):  # used as a base class
        self._fail()


def _host_names(module_name: str) -> dict:
    names = {name: getattr(host, name) for name in host.__all__}
    if module_name == "bgflow.utils" or module_name.startswith("bgflow.utils."):
        names.update({name: getattr(host.utils, name) for name in host.utils.__all__})
    return names


def _placeholder(name: str) -> _NotClaimed:
    """A missing module attribute: a placeholder, except for dunder names (introspection)."""
    if name.startswith("__"):
        raise AttributeError(name)
    return _NotClaimed(name)


class _HostAsBgflow(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``bgflow`` and ``bgflow.*``; each is a package of the host's names."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "bgflow" or fullname.startswith("bgflow."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__dict__.update(_host_names(spec.name))
        module.__getattr__ = _placeholder
        return module

    def exec_module(self, module):
        module.__path__ = []


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config, parser, args):
    """Before bgflow's conftest imports bgflow: make ``bgflow`` the host.

    A hook, not an import side effect, so that importing this module (pytest's doctest
    collection does) changes nothing.
    """
    for name in [n for n in sys.modules if n == "bgflow" or n.startswith("bgflow.")]:
        del sys.modules[name]
    sys.meta_path.insert(0, _HostAsBgflow())

"""Every docstring example in the package runs and shows what it claims."""

import doctest
import importlib
import pkgutil

import pytest

import smai_plugin

MODULES = sorted(name for _, name, _ in pkgutil.walk_packages(smai_plugin.__path__, "smai_plugin."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples of {name} failed (see above)"

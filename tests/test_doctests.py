"""Every docstring example in the package runs and gives what it shows."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import initopt
from initopt.integrations import MissingDependencyError

MODULES = sorted(m.name for m in pkgutil.walk_packages(initopt.__path__, "initopt.") if not m.name.endswith("__main__"))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    try:
        module = importlib.import_module(name)
    except MissingDependencyError as e:  # an integration whose optional package is not installed
        pytest.skip(str(e))
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0

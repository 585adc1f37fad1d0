"""The examples in the public docstrings run and give what they show."""

import doctest
import importlib

import pytest

MODULES = ["cucrf", "cucrf._api", "cucrf._params", "cucrf.unary", "cucrf.metrics"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0

"""Every docstring example in the package runs and prints what it shows."""

import doctest
import importlib
import pkgutil

import pytest
import torch

import ensdiv

MODULES = sorted(m.name for m in pkgutil.walk_packages(ensdiv.__path__, "ensdiv.")
                 if m.name != "ensdiv.__main__")


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    torch.manual_seed(0)
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS,
                             verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) of {name} failed"

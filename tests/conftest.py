"""Test-session settings shared by every test module, and the tiers of setup.cfg's markers:

    python -m pytest -q tests -m "not slow"                      # the fast tier (CPU, one process)
    python -m pytest -q tests -m "slow and not distributed"      # example and benchmark smoke runs
    python -m pytest -q tests -m distributed                     # tests/distributed/: multi-process (gloo)
    python -m pytest -q tests -m gpu                             # needs CUDA; skipped with the reason elsewhere
"""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def fresh_compiler_state():
    """Each module starts with no compiled graphs.

    Compiled flex attention remembers the shapes it has seen and then compiles with a dynamic batch size,
    which inductor's CPU flex template fails to build in torch 2.13 ("'cur_kvSplitSize5' was not declared").
    Modules that compile flex stay independent of each other this way.
    """
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def pytest_terminal_summary(terminalreporter):
    """tests/test_bad_input.py: how many bad-input and fault cases were handled (passed)."""
    handled = [r for r in terminalreporter.stats.get("passed", []) if "test_bad_input.py::" in r.nodeid]
    if handled:
        terminalreporter.write_line(f"bad input: {len(handled)} cases handled (tests/test_bad_input.py)")


def pytest_collection_modifyitems(config, items):
    """A `gpu` test is skipped, with why, where there is no CUDA device. (The modules of tests/distributed/ mark
    themselves `distributed` and `slow`; tests/test_examples_and_configs.py checks that every one does.)"""
    no_cuda = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
            item.add_marker(no_cuda)

"""Test-session settings shared by every test module."""

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

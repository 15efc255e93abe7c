"""pytest fixtures (the helpers themselves are in helpers.py)."""
from __future__ import annotations

import pytest

from helpers import tiny_model


@pytest.fixture
def llama():
    return tiny_model("llama")

"""Fixtures of the command-line tests."""
from __future__ import annotations

import pytest

from helpers import byte_tokenizer, tiny_lm


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A saved tiny model folder with its byte tokenizer, as a user's --model folder."""
    path = tmp_path_factory.mktemp("tiny-model")
    tiny_lm().save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return str(path)

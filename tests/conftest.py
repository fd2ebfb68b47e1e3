"""Fixtures shared by the test files. Tests run tiny models: one thread is faster than two (no fork/join
overhead) and immune to a busy neighbour."""
import pytest
import torch

from helpers import tiny_gpt

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def target():
    """A random 2-layer GPT over 64 tokens on a 4 x 4 grid, sharpened so that p is far from uniform."""
    return tiny_gpt(vocab=64, grid=(4, 4), sharpen=3.0)

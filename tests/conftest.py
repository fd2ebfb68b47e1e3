"""Tests run tiny models: one thread is faster than two (no fork/join overhead) and immune to a busy neighbour."""
import torch

torch.set_num_threads(1)

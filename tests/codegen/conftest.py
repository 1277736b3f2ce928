import os

import pytest
import torch

# Triton's interpreter runs the kernels on CPU tensors. It must be on before the generated kernel
# modules are imported (triton.jit decides then), and off where a GPU is present, so that the same
# tests, and the `-m gpu` ones, run the compiled kernels there. Setting it for this process leaves
# other tests unaffected: nothing else uses Triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"

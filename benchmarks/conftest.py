"""Layer benchmarks: CUDA runs the Llama-3-8B shapes, CPU-only machines run tiny shapes (never breaks)."""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(__file__))

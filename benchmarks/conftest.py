"""pytest-benchmark tier (benchmarks/tier/): `pytest benchmarks --benchmark-only` from the repository root.

CUDA runs the Llama shapes, CPU-only machines tiny shapes with the Triton kernels interpreted (never breaks).
The tier imports the layer builders of the scripts in benchmarks/scripts/ and the timing helpers in
benchmarks/helpers/ by module name, so both folders go on sys.path here.
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton's own switch: read when the kernels are defined
HERE = os.path.dirname(os.path.abspath(__file__))
for _sub in ("helpers", "scripts"):
    if os.path.join(HERE, _sub) not in sys.path:
        sys.path.insert(0, os.path.join(HERE, _sub))

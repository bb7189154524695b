"""Helpers shared by the ops tests (imported by module name: tests/ has no __init__.py)."""
import torch

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """‖a − ref‖ / ‖ref‖ in float64; NaN never passes."""
    a = a.double()
    ref = ref.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def make_x(shape3d, K, dtype, layout, device=DEVICE):
    """x of logical shape [B, T, K] (or [B*T, K] when shape3d is None-like), in one of several layouts."""
    B, T = shape3d
    if layout == "contig":
        x = torch.randn(B, T, K, dtype=dtype, device=device)
    elif layout == "strided_k":  # last-dim stride 2: viewable as 2-D, not contiguous
        x = torch.randn(B, T, 2 * K, dtype=dtype, device=device)[..., ::2]
    elif layout == "transposed_bt":  # [T, B, K] transposed: not viewable as 2-D
        x = torch.randn(T, B, K, dtype=dtype, device=device).transpose(0, 1)
    elif layout == "2d":
        x = torch.randn(B * T, K, dtype=dtype, device=device)
    else:
        raise ValueError(layout)
    return x


def make_weight(N, K, dtype, transposed, device=DEVICE):
    if transposed:  # GPT-2 Conv1D: weight = conv1d.weight.t(), strides (1, N)
        return (torch.randn(K, N, dtype=dtype, device=device) / K**0.5).t()
    return torch.randn(N, K, dtype=dtype, device=device) / K**0.5


class env_var:
    """Context manager: set an environment variable, restore it afterwards (usable inside @given)."""

    def __init__(self, name, value):
        self.name, self.value = name, value

    def __enter__(self):
        import os
        self.old = os.environ.get(self.name)
        os.environ[self.name] = self.value

    def __exit__(self, *exc):
        import os
        if self.old is None:
            os.environ.pop(self.name, None)
        else:
            os.environ[self.name] = self.old

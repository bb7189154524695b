"""OFT's math (Orthogonal Finetuning, PEFT's ``OFTConfig``), pure PyTorch.

OFT rotates a layer's input with a block-diagonal orthogonal matrix R = diag(R_1, …, R_n) (n blocks of b × b,
n·b = in_features) before the frozen layer: y = base(x·R), i.e. W' = W·Rᵀ. Each R_i comes from a skew-symmetric
Q_i (its b(b-1)/2 upper-triangle entries are the trained vector) through the Cayley transform

    R = (I - Q)(I + Q)⁻¹                                  (exact; PEFT: use_cayley_neumann=False)
    R ≈ I + 2Q + 2Q² + … + 2Q^(k-2) + Q^(k-1)            (Cayley-Neumann, k = num_cayley_neumann_terms, k ≥ 3)

(k = 1: I; k = 2: I + 2Q; k = 3 and k = 4 both stop at Q³: PEFT's loop, kept as written). The truncated series is
that of (I + Q)(I - Q)⁻¹, the exact form's transpose (the exact transform of -Q): PEFT's two options differ in the
sign of Q, so an adapter trained with one gives another rotation under the other. With ``block_share``
every block uses the same single R_1. COFT (``coft``) first pulls Q back into a Frobenius ball of radius
eps/√(number of blocks) around zero.

Nothing here forms the dense in × in matrix: ``rotate_blocks`` applies R as one batched GEMM over the n blocks
(x viewed as [M, n, b]), one plain GEMM when the blocks are shared, and ``block_diagonal`` exists only for
checking against PEFT's dense form.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

Indices = Optional[Tuple[torch.Tensor, torch.Tensor]]  # torch.triu_indices(b, b, 1) as (rows, cols), cached by callers

__all__ = ["skew_symmetric", "cayley_rotation", "coft_project", "rotate_blocks", "block_diagonal", "adjusted_divisor"]


def skew_symmetric(vec: torch.Tensor, block_size: int, indices: Indices = None) -> torch.Tensor:
    """[n, b(b-1)/2] upper-triangle entries (row-major, diagonal excluded) -> [n, b, b] skew-symmetric Q.
    ``indices``: the upper triangle's (rows, cols) on vec's device, when the caller keeps them (else made here).

    >>> q = skew_symmetric(torch.tensor([[1.0, 2.0, 3.0]]), 3)
    >>> q[0].tolist()
    [[0.0, 1.0, 2.0], [-1.0, 0.0, 3.0], [-2.0, -3.0, 0.0]]
    """
    rows, cols = indices if indices is not None else torch.triu_indices(block_size, block_size, 1, device=vec.device)
    upper = vec.new_zeros(vec.shape[0], block_size, block_size)
    upper[:, rows, cols] = vec
    return upper - upper.transpose(-2, -1)


def _skew_entries(matrix: torch.Tensor, block_size: int, indices: Indices = None) -> torch.Tensor:
    rows, cols = indices if indices is not None else torch.triu_indices(block_size, block_size, 1, device=matrix.device)
    return matrix[:, rows, cols]


def cayley_rotation(vec: torch.Tensor, block_size: int, use_neumann: bool = True, num_terms: int = 5,
                    indices: Indices = None, minus_identity: bool = False) -> torch.Tensor:
    """The blocks R [n, b, b] (vec's dtype) of the skew-symmetric blocks given by ``vec`` [n, b(b-1)/2]; with
    ``minus_identity`` R - I instead (the Neumann series simply starts from zero).

    The sums are formed in PEFT's order (same numbers): I, then 2Q, 2Q², 2Q³ … (2Q^(k-2)), then Q^(k-1).

    >>> r = cayley_rotation(torch.randn(4, 6) * 0.1, 4, use_neumann=False)
    >>> torch.allclose(r @ r.transpose(-1, -2), torch.eye(4).expand(4, 4, 4), atol=1e-6)
    True
    """
    q = skew_symmetric(vec, block_size, indices)
    n = q.shape[0]
    if use_neumann:
        if minus_identity:
            rotation = vec.new_zeros(n, block_size, block_size)
        else:
            rotation = torch.eye(block_size, device=vec.device, dtype=vec.dtype).repeat(n, 1, 1)
        if num_terms > 1:
            rotation.add_(q, alpha=2.0)
            if num_terms > 2:
                power = torch.bmm(q, q)
                rotation.add_(power, alpha=2.0)
                for _ in range(3, num_terms - 1):
                    power = torch.bmm(power, q)
                    rotation.add_(power, alpha=2.0)
                rotation.add_(torch.bmm(power, q))  # the last term, weight 1
        return rotation
    eye = torch.eye(block_size, device=q.device).expand(n, block_size, block_size)
    # X·(I + Q) = I - Q, solved for X (PEFT's torch.linalg.solve(..., left=False)); fp32 identity, as PEFT's
    rotation = torch.linalg.solve(eye + q, eye - q, left=False)
    return (rotation - eye if minus_identity else rotation).to(vec.dtype)


def coft_project(vec: torch.Tensor, block_size: int, eps: float, indices: Indices = None) -> torch.Tensor:
    """COFT's constraint: each block's Q (as a b × b matrix) scaled onto the Frobenius ball of radius eps/√n
    (n = number of stored blocks) when it lies outside; the projected upper-triangle entries."""
    q = skew_symmetric(vec, block_size, indices)
    # PEFT's radius: eps / sqrt(n) through a float32 CPU scalar tensor (the same rounding)
    radius = eps * 1 / torch.sqrt(torch.tensor(q.shape[0]))
    norm = torch.norm(q, dim=(1, 2), keepdim=True)
    projected = torch.where(norm <= radius, q, radius * (q / norm))
    return _skew_entries(projected, block_size, indices)


def rotate_blocks(x: torch.Tensor, blocks: torch.Tensor, plus_input: bool = False) -> torch.Tensor:
    """x·diag(B_1, …, B_n) without the dense matrix: x [..., n·b], blocks [n, b, b] or [1, b, b] (one block
    shared by all n). With ``plus_input``, x + x·diag(B): the form for B = R - I, whose small entries keep their
    precision in a low-precision dtype where R's (≈ 1 on the diagonal) would not.

    >>> x, b = torch.randn(2, 3, 6), torch.randn(3, 2, 2)
    >>> torch.allclose(rotate_blocks(x, b), x @ block_diagonal(b, 3), atol=1e-6)
    True
    """
    size = blocks.shape[-1]
    features = x.shape[-1]
    n = features // size
    if n * size != features:
        raise ValueError(f"input has {features} features, not a multiple of the block size {size}")
    flat = x.reshape(-1, n, size)
    if blocks.shape[0] == 1:  # block_share: every block the same: one GEMM over all M·n row blocks
        rotated = torch.matmul(flat.reshape(-1, size), blocks[0]).view(flat.shape)
    else:
        if blocks.shape[0] != n:
            raise ValueError(f"{blocks.shape[0]} rotation blocks for an input of {n} blocks of {size}")
        # [n, M, b] @ [n, b, b]: the block index is the batch of one strided batched GEMM
        rotated = torch.bmm(flat.transpose(0, 1), blocks).transpose(0, 1)
    out = flat + rotated if plus_input else rotated
    return out.reshape(x.shape)


def block_diagonal(blocks: torch.Tensor, n_blocks: Optional[int] = None) -> torch.Tensor:
    """The dense block-diagonal matrix (PEFT's form, for tests and checks): ``n_blocks`` copies when one shared
    block is given."""
    if blocks.shape[0] == 1 and n_blocks is not None:
        return torch.block_diag(*([blocks[0]] * n_blocks))
    return torch.block_diag(*blocks.unbind(0))


def adjusted_divisor(features: int, wanted: int) -> int:
    """PEFT's fix-up when ``wanted`` (oft_block_size, or r) does not divide ``features``: the nearest divisor, the
    lower one on a tie; ``features`` itself when wanted exceeds it.

    >>> adjusted_divisor(48, 32), adjusted_divisor(88, 32), adjusted_divisor(48, 64), adjusted_divisor(48, 16)
    (24, 22, 48, 16)
    """
    if wanted >= features:
        return features
    higher = wanted
    while higher <= features and features % higher != 0:
        higher += 1
    lower = wanted
    while lower > 1 and features % lower != 0:
        lower -= 1
    return lower if (wanted - lower) <= (higher - wanted) else higher

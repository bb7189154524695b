"""The trained parts of prompt learning: modules that turn virtual-token indices into prompt vectors.

Attribute names are PEFT's (``embedding``, ``transform``, ``mlp_head``, ``lstm_head``), so parameter names are
those of a PEFT ``prompt_encoder.<adapter>`` module; the order in which sub-modules are built is PEFT's too, so the
same seed gives the same initial values. ``inference_mode=True`` builds what PEFT builds for a loaded (frozen)
adapter: only a table that holds the encoder's output (``prompt_embeddings`` in the saved file) for every virtual
token. How the vectors reach the model is decided at the model level (``fastpeft/prompt_learning.py``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

__all__ = ["PromptEmbedding", "MultitaskPromptEmbedding", "PrefixEncoder", "PromptEncoder"]


class PromptEmbedding(nn.Module):
    """Prompt tuning: one trained vector per virtual token (PEFT's ``PromptEmbedding``).

    The initial values come from ``nn.Embedding`` (RANDOM); TEXT / SAMPLE_VOCAB initialisation copies word
    embeddings in afterwards (``init_from``), as PEFT does.

    >>> enc = PromptEmbedding(num_virtual_tokens=4, token_dim=8)
    >>> enc(torch.arange(4)[None]).shape, [n for n, _ in enc.named_parameters()]
    (torch.Size([1, 4, 8]), ['embedding.weight'])
    """

    def __init__(self, num_virtual_tokens: int, token_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(num_virtual_tokens, token_dim)

    def init_from(self, vectors: torch.Tensor) -> None:
        """Start from these vectors ([num_virtual_tokens, token_dim], e.g. word embeddings), kept in fp32."""
        self.embedding.weight = nn.Parameter(vectors.detach().clone().to(torch.float32))

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return self.embedding(indices)


class MultitaskPromptEmbedding(PromptEmbedding):
    """Multitask prompt tuning (PEFT's ``MultitaskPromptEmbedding``): the shared vectors (``embedding``) times, per
    row's task t, the rank-``num_ranks`` matrix ``prefix_task_cols[t] @ prefix_task_rows[t]`` (elementwise).
    Both task factors start N(0, 0.02²), drawn after the shared table, as PEFT draws them.

    >>> enc = MultitaskPromptEmbedding(num_virtual_tokens=4, token_dim=8, num_tasks=3, num_ranks=2)
    >>> enc(torch.arange(4).expand(2, -1), torch.tensor([0, 2])).shape
    torch.Size([2, 4, 8])
    """

    def __init__(self, num_virtual_tokens: int, token_dim: int, num_tasks: int, num_ranks: int):
        super().__init__(num_virtual_tokens, token_dim)
        self.prefix_task_cols = nn.Parameter(torch.normal(mean=0, std=0.02, size=(num_tasks, num_virtual_tokens,
                                                                                   num_ranks)))
        self.prefix_task_rows = nn.Parameter(torch.normal(mean=0, std=0.02, size=(num_tasks, num_ranks, token_dim)))

    def forward(self, indices: torch.Tensor, task_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        if task_ids is None:
            raise ValueError("multitask prompt tuning needs task_ids (one task index per row): "
                             "model(..., task_ids=...) / generate(..., task_ids=...)")
        task_prompts = torch.index_select(self.prefix_task_cols, 0, task_ids) @ \
            torch.index_select(self.prefix_task_rows, 0, task_ids)  # [batch, virtual, token_dim]
        return self.embedding(indices) * task_prompts


class PrefixEncoder(nn.Module):
    """Prefix tuning: per virtual token, the keys and values of every layer, flattened to ``num_layers * 2 *
    token_dim`` (PEFT's ``PrefixEncoder``). With ``prefix_projection`` (and not ``inference_mode``) they are computed
    by Linear(token_dim, encoder_hidden_size) -> tanh -> Linear(encoder_hidden_size, num_layers * 2 * token_dim)
    from a ``token_dim`` embedding; otherwise the flattened table is trained directly.

    >>> enc = PrefixEncoder(num_virtual_tokens=3, token_dim=8, num_layers=2, encoder_hidden_size=5, prefix_projection=True)
    >>> enc(torch.arange(3)[None]).shape
    torch.Size([1, 3, 32])
    """

    def __init__(self, num_virtual_tokens: int, token_dim: int, num_layers: int, encoder_hidden_size: Optional[int],
                 prefix_projection: bool = False, init_weights: Optional[str] = None, inference_mode: bool = False):
        super().__init__()
        flat = num_layers * 2 * token_dim
        self.prefix_projection = prefix_projection and not inference_mode
        if self.prefix_projection:
            self.embedding = nn.Embedding(num_virtual_tokens, token_dim)
            self.transform = nn.Sequential(nn.Linear(token_dim, encoder_hidden_size), nn.Tanh(),
                                           nn.Linear(encoder_hidden_size, flat))
            if init_weights == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, flat)
            if init_weights == "zero":
                nn.init.zeros_(self.embedding.weight)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        if self.prefix_projection:
            return self.transform(self.embedding(indices))
        return self.embedding(indices)


class PromptEncoder(nn.Module):
    """P-tuning: virtual-token embeddings passed through an encoder (PEFT's ``PromptEncoder``).

    "MLP": Linear(token_dim, hidden) -> ReLU -> Linear(hidden, hidden) -> ReLU -> Linear(hidden, token_dim).
    "LSTM": a bidirectional ``encoder_num_layers``-layer LSTM (dropout ``encoder_dropout``), then
    Linear(2 hidden, 2 hidden) -> ReLU -> Linear(2 hidden, token_dim). ``inference_mode`` keeps only the
    embedding table, which then holds the encoder's output.

    >>> enc = PromptEncoder(num_virtual_tokens=3, token_dim=8, encoder_hidden_size=5, encoder_type="LSTM")
    >>> enc(torch.arange(3)[None]).shape
    torch.Size([1, 3, 8])
    """

    def __init__(self, num_virtual_tokens: int, token_dim: int, encoder_hidden_size: int, encoder_type: str = "MLP",
                 encoder_num_layers: int = 2, encoder_dropout: float = 0.0, inference_mode: bool = False):
        super().__init__()
        if encoder_type not in ("MLP", "LSTM"):
            raise ValueError(f"encoder_type must be 'MLP' or 'LSTM', got {encoder_type!r}")
        self.encoder_type = encoder_type
        self.inference_mode = inference_mode
        self.embedding = nn.Embedding(num_virtual_tokens, token_dim)
        if inference_mode:
            return
        hidden = encoder_hidden_size
        if encoder_type == "LSTM":
            self.lstm_head = nn.LSTM(input_size=token_dim, hidden_size=hidden, num_layers=encoder_num_layers,
                                     dropout=encoder_dropout, bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, token_dim))
        else:
            # PEFT uses exactly these three layers whatever encoder_num_layers says (and warns about it)
            self.mlp_head = nn.Sequential(nn.Linear(token_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                          nn.Linear(hidden, token_dim))

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        embeds = self.embedding(indices)
        if self.inference_mode:
            return embeds
        if self.encoder_type == "LSTM":
            return self.mlp_head(self.lstm_head(embeds)[0])
        return self.mlp_head(embeds)

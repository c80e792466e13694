"""What one forward step computes: a flat batch of new tokens from several sequences.

Prefill, chunked prefill and decode are the same thing here: each sequence contributes the
tokens [start, end) of its context; their KV planes are stored into the sequence's pages first,
then attention reads positions [0, end) back through the page table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SeqChunk:
    """One sequence's share of a step. Token rows index the L1 pool (see kv/pool.py)."""

    start: int  # first new position
    end: int  # one past the last new position == context length after this step
    offset: int  # index of the first new token in the flat batch
    ctx_rows: torch.Tensor  # [end] flat pool rows of positions 0..end-1
    request_id: str = ""

    @property
    def n(self) -> int:
        return self.end - self.start


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    new_rows: torch.Tensor  # [T] flat pool rows where the new tokens' planes are stored
    seqs: list[SeqChunk]
    # Hooks the integrity layer installs: called before a plane of a layer is read for a
    # sequence (fence wait + epoch/owner validation). Signature: (layer, plane, seq_index).
    before_read: list = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def last_token_index(self) -> torch.Tensor:
        """[B] flat index of each sequence's last new token (whose logits are sampled)."""
        return torch.tensor([s.offset + s.n - 1 for s in self.seqs], dtype=torch.long)

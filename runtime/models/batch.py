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
    # The sequence's page slots (at least cdiv(end, page_size)); None: derived from ctx_rows
    # (slot = ctx_rows[::page_size] // page_size). Only the kernel path reads it.
    pages: list[int] | None = None
    # Trailing new tokens whose logits the step returns: 1 (the last token), or 1 + k when the
    # sequence verifies k speculative draft tokens (runtime/speculative.py).
    n_logits: int = 1

    @property
    def n(self) -> int:
        return self.end - self.start


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    # [T] flat pool rows where the new tokens' planes are stored; -1: computed, not stored (a
    # position recomputed only for its hidden state, whose rows are already in the cache)
    new_rows: torch.Tensor
    seqs: list[SeqChunk]
    # Hooks the integrity layer installs: called before a plane of a layer is read for a
    # sequence (fence wait + epoch/owner validation). Signature: (layer, plane, seq_index).
    before_read: list = field(default_factory=list)
    _kernel_meta: KernelMeta | None = field(default=None, repr=False, compare=False)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def last_token_index(self) -> torch.Tensor:
        """[R] flat index of each sequence's last ``n_logits`` new tokens (whose logits are
        sampled or verified), sequence by sequence: R = B unless drafts are verified."""
        idx = [s.offset + s.n - j for s in self.seqs for j in range(s.n_logits, 0, -1)]
        return torch.tensor(idx, dtype=torch.long)

    @property
    def plain(self) -> bool:
        """One logits row per sequence and every new token stored: what graphs serve."""
        return all(s.n_logits == 1 for s in self.seqs) and not self.has_unstored

    @property
    def has_unstored(self) -> bool:
        return bool(self.new_rows.numel()) and bool((self.new_rows < 0).any())

    def kernel_meta(self, page_size: int, device: torch.device) -> KernelMeta:
        """The index tensors the Triton kernel path reads (built once per batch)."""
        km = self._kernel_meta
        if km is None or km.page_size != page_size or km.device != torch.device(device):
            km = self._kernel_meta = KernelMeta.build(self, page_size, torch.device(device))
        return km


@dataclass
class KernelMeta:
    """Page tables and per-token indices for the Triton kernel path (see docs/kernels.md).

    Row b of ``page_table`` is sequence ``seqs[b]``; unused entries are 0 and never read (every
    kernel limits its reads to positions < ``token_limit``). Under CUDA graphs the same fields are
    static buffers padded to a batch-size bucket: padding tokens have ``slot_mapping`` -1 (no store)
    and ``token_limit`` 0 (no key read).
    """

    page_size: int
    device: torch.device
    page_table: torch.Tensor  # int32 [B, max_pages]
    seq_lens: torch.Tensor  # int32 [B] context length after the step (SeqChunk.end)
    token_seq: torch.Tensor  # int32 [T] page_table row of each new token
    token_limit: torch.Tensor  # int32 [T] position + 1 (causal: keys [0, limit) visible)
    slot_mapping: torch.Tensor  # int64 [T] flat pool row each new token is stored at
    max_len: int  # >= every token_limit; a host int (no sync), static under CUDA graphs

    @staticmethod
    def page_rows(seqs: list[SeqChunk], page_size: int) -> list[torch.Tensor | list[int]]:
        """Each sequence's page slots covering [0, end), from ``pages`` or ``ctx_rows``."""
        out: list[torch.Tensor | list[int]] = []
        for s in seqs:
            n = -(-s.end // page_size)
            if s.pages is not None:
                assert len(s.pages) >= n, f"{len(s.pages)} pages for {s.end} positions"
                out.append(list(s.pages[:n]))
            else:
                out.append(s.ctx_rows[: s.end : page_size] // page_size)
        return out

    @classmethod
    def build(
        cls, batch: ForwardBatch, page_size: int, device: torch.device, max_pages: int = 0
    ) -> KernelMeta:
        seqs = batch.seqs
        rows = cls.page_rows(seqs, page_size)
        width = max([max_pages, 1] + [len(r) for r in rows])
        if all(isinstance(r, list) for r in rows):  # one host-to-device copy
            padded = [r + [0] * (width - len(r)) for r in rows]
            pt = torch.tensor(padded, dtype=torch.int32).reshape(len(seqs), width).to(device)
        else:
            pt = torch.zeros((len(seqs), width), dtype=torch.int32, device=device)
            for b, r in enumerate(rows):
                if len(r):
                    pt[b, : len(r)] = torch.as_tensor(r, device=device).to(torch.int32)
        t = batch.num_tokens
        tok_seq, limit = [0] * t, [0] * t
        for b, s in enumerate(seqs):
            tok_seq[s.offset : s.offset + s.n] = [b] * s.n
            limit[s.offset : s.offset + s.n] = range(s.start + 1, s.end + 1)
        i32 = dict(dtype=torch.int32, device=device)
        return cls(
            page_size=page_size,
            device=device,
            page_table=pt,
            seq_lens=torch.tensor([s.end for s in seqs], **i32),
            token_seq=torch.tensor(tok_seq, **i32),
            token_limit=torch.tensor(limit, **i32),
            slot_mapping=batch.new_rows.to(device=device, dtype=torch.int64),
            max_len=max([1] + [s.end for s in seqs]),
        )

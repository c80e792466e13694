"""One rank's page tables in process (a world of 1: the agreement collectives are identities):
prefix reuse, room, epoch/owner validation, abort into DRAINING. No model, no processes."""

from __future__ import annotations

import pytest
import torch

from runtime.errors import KvscopeError
from runtime.kv.allocator import PageState
from runtime.layersplit.collective import Collective
from runtime.layersplit.drain import CrossRankDrain
from runtime.layersplit.pages import RankPages, RankSeq
from runtime.layersplit.rank_tiers import RankTiers, TierConfig
from runtime.model_config import load_config

PAGE = 8


@pytest.fixture
def rank_pages(dsa5):
    cfg = load_config(dsa5)
    owners = [tuple(range(cfg.num_layers))]
    tiers = RankTiers(cfg, dsa5, owners, 0, torch.float32, torch.device("cpu"), TierConfig(8, PAGE))
    drain = CrossRankDrain(tiers.alloc)
    yield RankPages(tiers, Collective(1), drain)
    tiers.close()


def _seq(i: int, prompt: list[int], new: int = 4) -> RankSeq:
    return RankSeq(i, prompt, new, tokens=list(prompt))


def test_prefix_reuse_room_and_validation(rank_pages):
    p, alloc = rank_pages, rank_pages.alloc
    a = _seq(0, list(range(2, 22)))  # 20 tokens + 4: 3 pages
    assert p.admit(a) and a.cached == 0 and len(a.slots) == 3
    a.stored = len(a.tokens)  # as if the prefill ran
    p.commit_full(a)
    assert a.committed == 2
    b = _seq(1, list(range(2, 18)) + [99])  # shares two full pages with a
    assert p.admit(b) and b.cached == 16 and b.slots[:2] == a.slots[:2]
    assert b.cached_local == {"L1": 16, "L2": 0, "L3": 0}
    p.validate(b)
    big = _seq(2, list(range(40, 70)), new=10)  # 5 pages: 4 are free, none evictable
    assert not p.admit(big) and not alloc.owned(big.sid)  # rolled back
    # a page reclaimed under its owner is caught at the next read (invariant 3)
    alloc.release(b.sid)
    with pytest.raises(KvscopeError, match="seq1 page 0 .* failed validation"):
        p.validate(b)


def test_abort_holds_private_pages_until_acked(rank_pages):
    p, alloc, drain = rank_pages, rank_pages.alloc, rank_pages.drain
    a = _seq(0, list(range(2, 22)))
    assert p.admit(a)
    a.stored = len(a.tokens)
    p.commit_full(a)
    p.abort(a, now=0)
    # the two committed pages stay CACHED (in the tree, immutable); the partial one drains
    assert [alloc.state(s) for s in a.slots] == [
        PageState.CACHED,
        PageState.CACHED,
        PageState.DRAINING,
    ]
    assert drain.local_acks() == [1]
    drain.apply([0], now=1)  # another rank has not acked: still DRAINING
    assert alloc.state(a.slots[2]) is PageState.DRAINING
    drain.apply([1], now=2)
    assert alloc.state(a.slots[2]) is PageState.FREE and not drain.pending
    assert drain.pages_drained == drain.pages_acked == 1

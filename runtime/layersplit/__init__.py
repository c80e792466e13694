"""LayerSplit: KV layer ownership across ranks with context-parallel prefill (docs/layersplit.md).

`run_layer_split(model_dir, n_ranks, prompts, max_new_tokens)` spawns the ranks and returns a
`LayerSplitResult` (tokens, logits, finish reasons, cached tokens by tier, per-rank telemetry,
`layer_owners`). Each rank keeps its owned layers' KV in its own HiCache tiers (L1/L2/L3) and
decodes every running sequence together.
"""

from runtime.layersplit.drain import CrossRankDrain
from runtime.layersplit.ownership import RankKV, assign_layers, layer_token_bytes
from runtime.layersplit.rank_tiers import RankTiers, TierConfig
from runtime.layersplit.runner import LayerSplitResult, run_layer_split
from runtime.layersplit.telemetry import RankTelemetry, layer_owners

__all__ = [
    "CrossRankDrain",
    "LayerSplitResult",
    "RankKV",
    "RankTelemetry",
    "RankTiers",
    "TierConfig",
    "assign_layers",
    "layer_owners",
    "layer_token_bytes",
    "run_layer_split",
]

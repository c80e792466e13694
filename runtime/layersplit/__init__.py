"""LayerSplit: KV layer ownership across ranks with context-parallel prefill (docs/layersplit.md).

`run_layer_split(model_dir, n_ranks, prompts, max_new_tokens)` spawns the ranks and returns a
`LayerSplitResult` (tokens, logits, per-rank telemetry, `layer_owners`).
"""

from runtime.layersplit.ownership import RankKV, assign_layers, layer_token_bytes
from runtime.layersplit.runner import LayerSplitResult, run_layer_split
from runtime.layersplit.telemetry import RankTelemetry, layer_owners

__all__ = [
    "LayerSplitResult",
    "RankKV",
    "RankTelemetry",
    "assign_layers",
    "layer_owners",
    "layer_token_bytes",
    "run_layer_split",
]

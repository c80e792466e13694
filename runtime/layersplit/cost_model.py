"""LayerSplit cost model: per-rank KV memory, broadcast bytes, and the link bandwidth at which
the owner's latent broadcast hides behind the DSA indexer (docs/layersplit.md).

    python -m runtime.layersplit.cost_model            # GLM-5 table (78 layers, 4 and 8 ranks)
    python -m runtime.layersplit.cost_model --validate # + a measured 2/3-rank CPU run vs predicted

`predict_traffic` gives the exact bytes the implementation moves for a config, ownership and
prompts; the tests compare it to the ranks' telemetry.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from runtime.layersplit.ownership import assign_layers, layer_token_bytes
from runtime.model_config import ModelConfig


@dataclass(frozen=True)
class Glm5:
    layers: int = 78
    latent: int = 512 + 64  # kv_lora_rank + qk_rope_head_dim
    index_dim: int = 128  # index_head_dim
    index_heads: int = 32  # index_n_heads
    index_topk: int = 2048
    hidden: int = 6144
    elem: int = 2  # bf16

    @property
    def token_layer_bytes(self) -> int:
        return (self.latent + self.index_dim) * self.elem


GPU_FLOPS = 400e12  # assumed sustained indexer throughput (H100 bf16 GEMM, ~40 % of peak)


def indexer_flops(c: int, n_ranks: int, m: Glm5 = Glm5()) -> float:
    """Prefill indexer FLOPs per rank per layer: c/N queries, each scoring its causal prefix
    (c/2 keys on average) with Hi heads of Di: 2 * Hi * Di * (c/N) * (c/2)."""
    return m.index_heads * m.index_dim * c * c / n_ranks


def glm5_row(c: int, n_ranks: int, m: Glm5 = Glm5(), flops: float = GPU_FLOPS) -> dict:
    owners = assign_layers([m.token_layer_bytes] * m.layers, n_ranks)
    max_owned = max(len(o) for o in owners)
    per_layer = c * m.token_layer_bytes  # the owner broadcasts both planes for [0, c)
    latent = c * m.latent * m.elem  # the part that overlaps the indexer
    t_idx = indexer_flops(c, n_ranks, m) / flops
    return {
        "tokens": c,
        "ranks": n_ranks,
        "kv_single_gb": c * m.token_layer_bytes * m.layers / 1e9,
        "kv_rank_gb": c * m.token_layer_bytes * max_owned / 1e9,
        "bcast_buf_gb": per_layer / 1e9,
        "saving": 1 - max_owned / m.layers,
        "bcast_layer_mb": per_layer / 1e6,
        "index_k_mb": c * m.index_dim * m.elem / 1e6,
        "indexer_ms": t_idx * 1e3,
        "hide_gbps": latent / t_idx / 1e9,
        "decode_hop_kb": (m.hidden * m.elem + (1 + m.index_topk) * 8) / 1e3,
        "decode_pull_mb": (c * m.token_layer_bytes) / 1e6,
    }


def table(ctx=(40_000, 100_000, 200_000), ranks=(4, 8), flops: float = GPU_FLOPS) -> str:
    head = (
        "| tokens | ranks | KV 1 rank (GB) | KV per rank (GB) | saving | bcast buffer (GB) "
        "| bcast / layer (MB) | of it index_k (MB) | indexer / layer (ms) | hide at (GB/s) |"
    )
    lines = [head, "|" + "---|" * 10]
    for c in ctx:
        for n in ranks:
            r = glm5_row(c, n, flops=flops)
            lines.append(
                f"| {c // 1000}K | {n} | {r['kv_single_gb']:.2f} | {r['kv_rank_gb']:.2f} "
                f"| {r['saving']:.1%} | {r['bcast_buf_gb']:.3f} | {r['bcast_layer_mb']:.1f} "
                f"| {r['index_k_mb']:.1f} | {r['indexer_ms']:.2f} | {r['hide_gbps']:.1f} |"
            )
    return "\n".join(lines)


def predict_traffic(
    cfg: ModelConfig,
    owners,
    prompt_lens,
    max_new,
    elem: int,
    cached=None,
    max_batch: int = 16,
) -> dict:
    """Exact bytes the implementation moves (sum over ranks) for greedy runs of `max_new`
    tokens (one value or one per prompt) without EOS, aborts or timeouts, `cached` prompt tokens
    reused per prompt (page aligned, agreed), up to `max_batch` sequences decoded together:
    owner broadcasts, gathers to owners, decode hops. Mirrors the loop's schedule (loop.py):
    each step boundary admits waiting prompts (prefill gives their first token), then runs one
    decode step for every running sequence."""
    n, count = len(owners), len(prompt_lens)
    own = {li: r for r, ls in enumerate(owners) for li in ls}
    new = list(max_new) if isinstance(max_new, list | tuple) else [max_new] * count
    cached = list(cached) if cached is not None else [0] * count
    bsent = gather = hop = hops = 0
    for length, start in zip(prompt_lens, cached, strict=True):
        for li in range(cfg.num_layers):
            tb = layer_token_bytes(cfg, li, elem)
            bsent += length * tb  # the owner broadcasts [0, length), reused prefix included
            o = own[li]
            mine = len(range(start + (o - start) % n, length, n))
            gather += (length - start - mine) * tb
    changes = sum(own[li] != own[li - 1] for li in range(1, cfg.num_layers))
    waiting, running = list(range(count)), {}  # prompt -> tokens generated
    while waiting or running:
        while waiting and len(running) < max_batch:
            i = waiting.pop(0)
            if new[i] > 1:
                running[i] = 1
        if not running:
            continue
        ctx = [prompt_lens[i] + g for i, g in running.items()]  # context after this step
        msg = len(ctx) * cfg.hidden_size * elem
        if cfg.is_mla and max(ctx) > cfg.index_topk:
            msg += len(ctx) * (1 + cfg.index_topk) * 8
        hop += changes * msg
        hops += changes
        for i in list(running):
            running[i] += 1
            if running[i] >= new[i]:
                del running[i]
    return {
        "bcast_bytes_sent": bsent,
        "bcast_bytes_recv": bsent * (n - 1),
        "gather_bytes": gather,
        "hop_bytes": hop,
        "hops": hops,
    }


def measured(res) -> dict:
    t = res.telemetry
    return {
        "bcast_bytes_sent": sum(x.bcast_bytes_sent for x in t),
        "bcast_bytes_recv": sum(x.bcast_bytes_recv for x in t),
        "gather_bytes": sum(x.gather_bytes_sent for x in t),
        "hop_bytes": sum(x.hop_bytes for x in t),
        "hops": sum(x.hops for x in t),
    }


def validate(n_ranks: int = 3) -> str:
    """Run the tiny glm_moe_dsa (5 layers) on n_ranks gloo ranks; measured vs predicted."""
    import tempfile

    from runtime.layersplit.runner import run_layer_split
    from runtime.model_config import load_config
    from runtime.weights.tiny import write_tiny

    with tempfile.TemporaryDirectory() as d:
        path = write_tiny(d, "glm_moe_dsa", num_hidden_layers=5)
        cfg = load_config(path)
        prompts, new = [list(range(2, 42)), list(range(3, 20))], 6
        res = run_layer_split(path, n_ranks, prompts, new, page_size=16)
    cached = [c["tokens"] for c in res.cached]
    pred = predict_traffic(cfg, res.layer_owners, [len(p) for p in prompts], new, 4, cached)
    meas = measured(res)
    lines = [f"tiny glm_moe_dsa, 5 layers, {n_ranks} gloo ranks, owners {res.layer_owners}"]
    lines += ["| quantity | predicted | measured |", "|---|---|---|"]
    lines += [f"| {k} | {pred[k]} | {meas[k]} |" for k in pred]
    for t in res.telemetry:
        share = len(t.owned_layers) / cfg.num_layers * res.single_rank_kv_bytes
        lines.append(
            f"| rank {t.rank} L1 KV bytes (<= owned/all x {res.single_rank_kv_bytes}) "
            f"| {share:.0f} | {t.kv_bytes['L1']} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime.layersplit.cost_model")
    p.add_argument("--tflops", type=float, default=GPU_FLOPS / 1e12, help="indexer TFLOP/s")
    p.add_argument("--validate", action="store_true", help="also run a tiny CPU gloo check")
    a = p.parse_args(argv)
    print(
        f"GLM-5: 78 layers, latent 576 + index_k 128 per token per layer, bf16; indexer at "
        f"{a.tflops:g} TFLOP/s"
    )
    print(table(flops=a.tflops * 1e12))
    if a.validate:
        print()
        print(validate())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

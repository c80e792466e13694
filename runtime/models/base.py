"""Shared skeleton of a causal MoE LM over paged KV: embedding, layer loop, norm, LM head."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.backend import use_triton
from runtime.errors import CheckpointError
from runtime.kv.pool import KVPool
from runtime.model_config import ModelConfig
from runtime.models.batch import ForwardBatch
from runtime.models.layers import DenseMLP, Experts, MoE, Router, linear
from runtime.models.rope import RotaryTables
from runtime.models.steps import EagerStep, KernelStep
from runtime.weights import dense_cpu, fp8
from runtime.weights.checkpoint import Checkpoint
from runtime.weights.expert_cache import slot_kernel
from runtime.weights.quant import (
    chunked_resident_experts,
    head_format,
    is_linear_weight,
    quantize_weight,
    resident_experts,
)


class WeightReader:
    """Reads tensors by HF name, checking each against the shape config.json implies.

    With a `WeightPlan` (runtime/weights/placement.py) linear weights (names in
    runtime/weights/quant.LINEAR_SUFFIXES, read without an explicit dtype) are quantized as
    ``--quant`` asks, or kept FP8 on Hopper; those come back as objects callable by linear().
    FP8 block-scaled weights (``<name>_scale_inv`` beside them) are dequantized on the fly.
    `tensor()` always returns a plain tensor.
    """

    def __init__(self, ckpt: Checkpoint, dtype: torch.dtype, device: torch.device, plan=None):
        self.ckpt, self.dtype, self.device, self.plan = ckpt, dtype, device, plan
        self.quant = plan.quant if plan is not None else "none"
        self.keep_fp8 = plan.keep_fp8 if plan is not None else False
        self.fp8_block = plan.fp8_block if plan is not None else fp8.block_size(ckpt.dir)
        self.pack = getattr(plan, "pack_bf16", False)  # oneDNN-packed bf16 (dense_cpu.py)

    def _fp8_scale(self, name: str, t: torch.Tensor) -> torch.Tensor | None:
        if t.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
            return None
        sname = fp8.scale_name(name)
        if not self.ckpt.has(sname):
            raise CheckpointError(
                f"{self.ckpt.file_of(name)}: FP8 tensor '{name}' has no '{sname}'; only "
                "block-scaled FP8 checkpoints (weight_scale_inv) are supported"
            )
        s = self.ckpt.get(sname)
        fp8.check_scale(name, t, s, self.fp8_block, str(self.ckpt.file_of(sname)))
        return s.to(self.device)

    def tensor(self, name: str, shape: tuple[int, ...], dtype: torch.dtype | None = None):
        t = self.ckpt.get(name, expect_shape=shape)
        scale = self._fp8_scale(name, t)
        if scale is not None:
            block, out_dtype = self.fp8_block, dtype or self.dtype
            return fp8.dequantize_fp8_block(t.to(self.device), scale, block, out_dtype).contiguous()
        return t.to(device=self.device, dtype=dtype or self.dtype).contiguous()

    def __call__(self, name: str, shape: tuple[int, ...], dtype: torch.dtype | None = None):
        if dtype is None and len(shape) == 2 and is_linear_weight(name):
            if self.quant != "none":
                return quantize_weight(self.tensor(name, shape), self.quant)
            if self.pack:
                return dense_cpu.pack(self.tensor(name, shape))
            if self.keep_fp8:
                t = self.ckpt.get(name, expect_shape=shape)
                scale = self._fp8_scale(name, t)
                if scale is not None:
                    return fp8.Fp8BlockWeight(t.to(self.device), scale, self.fp8_block)
        return self.tensor(name, shape, dtype)


def load_mlp(w: WeightReader, prefix: str, d: int, i: int) -> DenseMLP:
    return DenseMLP(
        gate=w(f"{prefix}.gate_proj.weight", (i, d)),
        up=w(f"{prefix}.up_proj.weight", (i, d)),
        down=w(f"{prefix}.down_proj.weight", (d, i)),
    )


def load_moe(w: WeightReader, cfg: ModelConfig, prefix: str) -> MoE:
    d, i, e = cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts
    router = Router(
        weight=w(f"{prefix}.gate.weight", (e, d)),
        bias=w(f"{prefix}.gate.e_score_correction_bias", (e,), torch.float32),
        top_k=cfg.num_experts_per_tok,
        n_group=cfg.n_group,
        topk_group=cfg.topk_group,
        norm_topk_prob=cfg.norm_topk_prob,
        scaling=cfg.routed_scaling_factor,
    )
    if w.plan is not None and w.plan.offload:  # routed experts behind the expert cache
        bank = w.plan.expert_bank(int(prefix.split(".")[2]), prefix, router)
        experts = Experts(None, None, bank=bank, fused_slots=slot_kernel(bank.cache))
    else:
        fields = None
        if w.ckpt.has(f"{prefix}.experts.gate_up_proj"):  # transformers-5 fused layout
            gate_up = w.tensor(f"{prefix}.experts.gate_up_proj", (e, 2 * i, d))
            down = w.tensor(f"{prefix}.experts.down_proj", (e, d, i))
        else:  # per-expert names, as the published checkpoints ship them

            def read(lo: int, hi: int):  # experts lo..hi-1: (gate_up, down) stacks
                gate_up = torch.empty((hi - lo, 2 * i, d), dtype=w.dtype, device=w.device)
                down = torch.empty((hi - lo, d, i), dtype=w.dtype, device=w.device)
                for x in range(lo, hi):
                    p = f"{prefix}.experts.{x}"
                    gate_up[x - lo, :i] = w.tensor(f"{p}.gate_proj.weight", (i, d))
                    gate_up[x - lo, i:] = w.tensor(f"{p}.up_proj.weight", (i, d))
                    down[x - lo] = w.tensor(f"{p}.down_proj.weight", (d, i))
                return gate_up, down

            fields = chunked_resident_experts(read, e, w.quant, w.device, w.pack)
            if fields is None:
                gate_up, down = read(0, e)
        experts = Experts(
            **(fields if fields is not None else resident_experts(gate_up, down, w.quant, w.pack))
        )
    shared = None
    if cfg.n_shared_experts > 0:
        shared = load_mlp(w, f"{prefix}.shared_experts", d, i * cfg.n_shared_experts)
    return MoE(router=router, experts=experts, shared=shared)


@dataclass
class DecoderLayer:
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    attn: object  # architecture-specific attention with forward(h, batch, pool, layer, state)
    mlp: DenseMLP | MoE


class CausalLM:
    """Forward over a ForwardBatch; KV planes live in a KVPool. Subclasses build `attn`."""

    def __init__(
        self,
        cfg: ModelConfig,
        ckpt: Checkpoint,
        dtype: torch.dtype,
        device,
        plan=None,
        mtp: bool = False,
    ):
        """``mtp``: also load the checkpoint's first multi-token-prediction layer (the
        speculative draft, runtime/models/mtp.py) when it has one."""
        self.cfg, self.dtype, self.device = cfg, dtype, torch.device(device)
        w = WeightReader(ckpt, dtype, self.device, plan)  # plan: runtime/weights/placement.py
        d, v = cfg.hidden_size, cfg.vocab_size
        self.rope = RotaryTables(cfg, self.device)  # cos/sin of absolute positions
        self.embed = w("model.embed_tokens.weight", (v, d))
        self.norm = w("model.norm.weight", (d,))
        if cfg.tie_word_embeddings and not ckpt.has("lm_head.weight"):
            self.lm_head = self.embed
        else:
            self.lm_head = w("lm_head.weight", (v, d))
        if w.quant != "none":  # int8, or int4 groups of 32 on the CPU (weights/quant.py)
            method, group = head_format(w.quant, self.device)
            self.lm_head = quantize_weight(self.lm_head, method, group=group)
        elif w.pack and self.lm_head is not self.embed:
            self.lm_head = dense_cpu.pack(self.lm_head)
        self.layers: list[DecoderLayer] = []
        for li in range(cfg.num_layers):  # MTP layers (index >= num_layers) stay unloaded
            p = f"model.layers.{li}"
            if cfg.mlp_layer_types[li] == "sparse":
                mlp = load_moe(w, cfg, f"{p}.mlp")
            else:
                mlp = load_mlp(w, f"{p}.mlp", d, cfg.intermediate_size)
            self.layers.append(
                DecoderLayer(
                    input_norm=w(f"{p}.input_layernorm.weight", (d,)),
                    post_norm=w(f"{p}.post_attention_layernorm.weight", (d,)),
                    attn=self.load_attention(w, li, f"{p}.self_attn"),
                    mlp=mlp,
                )
            )
        # The MTP draft layer (index num_layers), its KV planes at pool layer num_layers.
        self.mtp: list = []
        if mtp and cfg.num_nextn_predict_layers > 0:
            from runtime.models.mtp import load_mtp_layer

            try:
                self.mtp.append(load_mtp_layer(self, w, ckpt, cfg.num_layers))
            except CheckpointError as e:
                raise CheckpointError(
                    f"{e}; that is the MTP layer (speculative decoding): --speculative off "
                    "leaves it unloaded"
                ) from None
        extra = [k for k in ckpt.keys() if k.startswith("model.layers.")]
        unknown_layer = [
            k
            for k in extra
            if int(k.split(".")[2]) >= cfg.num_layers + cfg.num_nextn_predict_layers
        ]
        if unknown_layer:
            raise CheckpointError(
                f"{ckpt.file_of(unknown_layer[0])}: tensor '{unknown_layer[0]}' belongs to a layer "
                f"beyond num_hidden_layers={cfg.num_layers}; config and weights do not match"
            )

    def load_attention(self, w: WeightReader, layer: int, prefix: str):
        raise NotImplementedError

    @property
    def kv_layers(self) -> int:
        """Layers with KV planes in the pool: the main layers, then the MTP layer if loaded."""
        return self.cfg.num_layers + len(self.mtp)

    def run(self, input_ids: torch.Tensor, step, keep_hidden: bool = False):
        """The one forward of the model: embedding -> layers -> norm -> LM head, through a step
        backend (runtime/models/steps.py) that supplies the ops and the KV access. input_ids
        [T]; returns fp32 logits [R, V] of the rows ``step.last_rows`` keeps, and with
        ``keep_hidden`` also every row's final-norm hidden state [T, D] (the MTP's input)."""
        eps = self.cfg.rms_norm_eps
        h = F.embedding(input_ids, self.embed)  # [T, D]
        h, residual = self.run_layers(h, step, self.layers, 0)
        if keep_hidden:
            hn, _ = step.add_norm(h, residual, self.norm, eps)
            return linear(step.last_rows(hn), self.lm_head).float(), hn
        h, residual = step.last_rows(h), step.last_rows(residual)
        h, _ = step.add_norm(h, residual, self.norm, eps)
        return linear(h, self.lm_head).float()

    def run_layers(self, h: torch.Tensor, step, layers, first: int):
        """Decoder layers ``layers`` (pool layers first, first + 1, ...) over h [T, D]; returns
        (h, residual): the last layer's output and the residual stream before it is added."""
        eps = self.cfg.rms_norm_eps
        state: dict = {}  # carried across layers: the last full layer's DSA selection
        residual = None
        for li, layer in enumerate(layers, start=first):
            x, residual = step.add_norm(h, residual, layer.input_norm, eps)
            h = layer.attn.forward(x, step, li, state)
            x, residual = step.add_norm(h, residual, layer.post_norm, eps)
            h = layer.mlp(x, step)
        return h, residual

    def step_backend(self, batch: ForwardBatch, pool: KVPool, all_logits: bool, kernels):
        """The eager step backend: Triton kernels (``kernels``; None asks kernels.backend) or
        plain torch."""
        if kernels is None:
            kernels = use_triton(self.device)
        if kernels:
            return KernelStep.for_batch(self, batch, pool, all_logits)
        return EagerStep(self, batch, pool, all_logits)

    @torch.inference_mode()
    def forward(
        self,
        batch: ForwardBatch,
        pool: KVPool,
        all_logits: bool = False,
        kernels: bool | None = None,
        keep_hidden: bool = False,
    ):
        """Logits [R, V] of each sequence's last ``n_logits`` new tokens ([T, V] if all_logits;
        with ``keep_hidden`` a pair (logits, final-norm hidden [T, D])), eagerly: through the
        Triton kernels (``kernels``; None asks kernels.backend: CUDA, or CPU with
        KVSCOPE_TRITON_INTERPRET=1) or plain torch. Graph replays and compiled steps are the
        model runner's (runtime/models/runner.py)."""
        step = self.step_backend(batch, pool, all_logits, kernels)
        return self.run(batch.input_ids.to(self.device), step, keep_hidden)

    @torch.inference_mode()
    def draft(self, batch: ForwardBatch, pool: KVPool, prev_hidden, kernels: bool | None = None):
        """The MTP layer over a batch (runtime/models/mtp.py): (logits [R, V] of the kept rows,
        the layer's outputs [T, D])."""
        from runtime.models.mtp import mtp_forward

        step = self.step_backend(batch, pool, False, kernels)
        return mtp_forward(self, self.mtp[0], batch.input_ids.to(self.device), prev_hidden, step)


_MODEL_MODULES = (
    "runtime.models.base",
    "runtime.models.mtp",
    "runtime.models.layers",
    "runtime.models.glm_moe_dsa",
    "runtime.models.glm4_moe",
)


def _plain(obj) -> bool:
    """True when every weight under obj is a plain tensor or a ``graph_safe`` packed CPU weight
    (no other quantized / offloaded weight objects, whose calls may sync the host and cannot be
    captured or compiled)."""
    if obj is None or isinstance(obj, torch.Tensor | int | float | bool | str):
        return True
    if isinstance(obj, ModelConfig | RotaryTables):
        return True
    if isinstance(obj, Experts):
        return obj.stacked() is not None or obj.packed_stacks() is not None
    if getattr(type(obj), "graph_safe", False):  # packed CPU weights (weights/quant_cpu.py)
        return True
    if dataclasses.is_dataclass(obj) and type(obj).__module__ in _MODEL_MODULES:
        return all(_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    return False


def graph_safe(model: CausalLM, mtp: bool = False) -> bool:
    """Whether a decode step of this model (``mtp``: and of its MTP layer) can be captured or
    compiled (plain weights)."""
    tops = (model.embed, model.norm, model.lm_head)
    main = all(_plain(t) for t in tops) and all(_plain(ly) for ly in model.layers)
    return main and (not mtp or all(_plain(m) for m in model.mtp))

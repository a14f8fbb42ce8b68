"""The ``tokenselect`` attention backend.

Decode attends, per request and per layer, the first ``n_init`` tokens, the ``topk`` tokens
chosen by the head soft vote and the last ``n_local`` tokens. Prefill and extend are dense
(the parent backend's), or with ``sparse_prefill`` chunk-wise sparse (``prefill.py``): every
sub-chunk of ``prefill_chunk`` queries past the budget attends its own selection. Two classes
share that logic through ``TokenSelectDecodeMixin``:

- ``TokenSelectFlashInferBackend`` (CUDA): FlashInfer's paged decode, planned once per step
  with page size 1 and ``min(L, budget)`` tokens per request; each layer writes its
  selection's physical slots into the planned index buffer before the kernel runs.
- ``TokenSelectTorchBackend`` (CPU): the PyTorch reference of selection and attention, so
  SGLang's attention test kit can exercise the backend without a GPU.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc
from sglang.srt.runtime_context import get_parallel

from sglang_tokenselect.config import TokenSelectConfig, gpu_tp_vote_refusal
from sglang_tokenselect.kernels import reference as ref
from sglang_tokenselect.prefill import SparsePrefillStep, SubchunkPlan, build_step, plan_subchunks, select_subchunks
from sglang_tokenselect.rope import (
    BudgetBeyondWindowError,
    RopeSpec,
    UnsupportedRopeError,
    check_budget_within_window,
    rope_spec_of_hf_config,
    rope_spec_of_model,
    rotary_modules,
)
from sglang_tokenselect.selection import SelectionCache, SelectionOps, Selector, default_ops, supports_tp_group

if TYPE_CHECKING:
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch
    from sglang.srt.model_executor.model_runner import ModelRunner

logger = logging.getLogger(__name__)


class UnsupportedConfigError(ValueError):
    """A model or server option this backend does not support."""


def check_runner_supported(model_runner: "ModelRunner") -> None:
    """Refuse, naming the option or model property, what the backend cannot serve."""
    model_config = model_runner.model_config
    if model_runner.use_mla_backend:
        raise UnsupportedConfigError(
            "--attention-backend tokenselect does not support MLA models (e.g. DeepSeek V2/V3)."
        )
    if getattr(model_config, "is_encoder_decoder", False):
        raise UnsupportedConfigError(
            "--attention-backend tokenselect does not support encoder-decoder models."
        )
    if model_runner.sliding_window_size is not None:
        raise UnsupportedConfigError(
            "--attention-backend tokenselect does not support models with sliding-window "
            f"attention layers (sliding_window_size={model_runner.sliding_window_size})."
        )
    if model_runner.page_size != 1:
        raise UnsupportedConfigError(
            f"--attention-backend tokenselect needs --page-size 1, got {model_runner.page_size}."
        )
    if model_runner.kv_cache_dtype != model_runner.dtype:
        raise UnsupportedConfigError(
            "--attention-backend tokenselect does not support a quantized KV cache "
            f"(--kv-cache-dtype gave {model_runner.kv_cache_dtype}, model dtype {model_runner.dtype})."
        )
    if not model_runner.spec_algorithm.is_none():
        raise UnsupportedConfigError(
            "--attention-backend tokenselect does not support speculative decoding "
            "(--speculative-algorithm)."
        )


def rope_spec_of_runner(model_runner: "ModelRunner") -> RopeSpec:
    """The RoPE the runner's model applies (its rotary modules, else its HF config), checked for
    FlashInfer's in-kernel ROPE_LLAMA; UnsupportedConfigError (one line) otherwise."""
    model = getattr(model_runner, "model", None)
    try:
        if model is not None and rotary_modules(model):
            spec = rope_spec_of_model(model)
        else:
            spec = rope_spec_of_hf_config(model_runner.model_config.hf_text_config)
    except UnsupportedRopeError as exc:
        raise UnsupportedConfigError(str(exc)) from None
    head_dim = getattr(model_runner.model_config, "head_dim", spec.head_dim)
    if spec.head_dim != head_dim:
        raise UnsupportedConfigError(
            f"--tokenselect-extrapolate cannot serve this model: partial rotary dims (RoPE over {spec.head_dim} "
            f"of head_dim {head_dim})."
        )
    return spec


def extrapolation_spec(model_runner: "ModelRunner", config: TokenSelectConfig,
                       rope: Optional[RopeSpec]) -> Optional[RopeSpec]:
    """The RoPE to re-apply in-kernel when ``config.extrapolate`` (``rope`` or the model's); None
    when off. Refuses a model FlashInfer cannot serve and a budget past the trained context."""
    if not config.extrapolate:
        return None
    spec = rope if rope is not None else rope_spec_of_runner(model_runner)
    try:
        check_budget_within_window(spec, config.budget)
    except BudgetBeyondWindowError as exc:
        raise UnsupportedConfigError(str(exc)) from None
    return spec


def tp_vote_group(config: TokenSelectConfig, attn_tp_size: int, ops: SelectionOps):
    """The group whose ranks vote together: SGLang's attention TP group (its ``GroupCoordinator``)
    for ``--tokenselect-tp-vote global`` at TP > 1, else None (each rank votes over its own heads).
    Refuses global where ``ops`` cannot all-reduce (the Triton kernels, for now)."""
    if attn_tp_size <= 1 or config.tp_vote == "local":
        return None
    if not supports_tp_group(ops):
        raise UnsupportedConfigError(gpu_tp_vote_refusal(config, attn_tp_size))
    return get_parallel().attn_tp_group


@dataclass
class DecodeStep:
    """Per-step buffers shared by every layer (B = requests in the batch).

    kv_indptr [B + 1] int32; kv_indices [sum of min(L, budget)] int32; scratch: the selection
    ops' scratch (one for the backend's lifetime).
    """

    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor
    scratch: object


class TokenSelectDecodeMixin:
    """Selection state and decode-step planning shared by the CUDA and CPU backends."""

    def _init_tokenselect(self, model_runner: "ModelRunner", config: TokenSelectConfig,
                          stats_interval: int = 0, ops: Optional[SelectionOps] = None,
                          rope: Optional[RopeSpec] = None) -> None:
        check_runner_supported(model_runner)
        self.ts_config = config
        self.ts_rope = extrapolation_spec(model_runner, config, rope)
        self.ts_rope_tables = None  # (cos, sin) of this forward's positions, set by its first layer (CUDA)
        self.ts_rope_sel_tables = None
        if self.ts_rope is not None and torch.device(model_runner.device).type == "cuda":
            from sglang_tokenselect.kernels.triton_rope import rope_tables

            at = torch.tensor([config.n_local], device=model_runner.device)
            cos, sin = rope_tables(at, self.ts_rope.head_dim, self.ts_rope.theta, self.ts_rope.scale)
            self.ts_rope_sel_tables = (cos[0].contiguous(), sin[0].contiguous())
        self.ts_stats_interval = stats_interval
        pool = model_runner.token_to_kv_pool
        self.ts_start_layer = getattr(pool, "start_layer", 0)
        tp = get_parallel().attn_tp_size
        num_heads = model_runner.model_config.get_num_attention_heads(tp)
        self.ts_num_heads = num_heads
        device = torch.device(model_runner.device)
        cache = SelectionCache.allocate(
            num_layers=pool.layer_num,
            num_rows=model_runner.req_to_token_pool.req_to_token.shape[0],
            query_width=num_heads * model_runner.model_config.head_dim,
            topk=config.topk,
            dtype=model_runner.dtype,
            device=device,
        )
        ops = ops or default_ops(device)
        self.ts_selector = Selector(config, cache, ops, group=tp_vote_group(config, tp, ops))
        # Candidates of one layer's miss rows, end to end: at most the token pool, except when
        # requests of one batch share a radix prefix (then the rows that do not fit overflow).
        self.ts_capacity = getattr(model_runner, "max_total_num_tokens", None) or pool.size
        self.ts_scratch = self._alloc_scratch(model_runner.req_to_token_pool.req_to_token.shape[0])
        self.ts_retired_scratch: list = []
        self.ts_step: Optional[DecodeStep] = None
        self.ts_prefill: Optional[SparsePrefillStep] = None  # the current sparse extend, if any
        self.ts_sparse_extends = 0
        self.ts_decode_steps = 0
        self.ts_monitor = self._make_monitor(model_runner)
        logger.info(
            "TokenSelect: n_init=%d topk=%d n_local=%d (budget %d tokens), cache threshold %.3g, "
            "score scale %s, vote %s; Selection Cache %.1f MB for %d pool rows x %d layers; "
            "selection scratch %.1f MB for %d requests and %d candidates per layer; sparse prefill %s; "
            "attention TP %d, %s vote",
            config.n_init, config.topk, config.n_local, config.budget, config.cache_threshold,
            "layer" if config.score_scale is None else config.score_scale, config.vote,
            cache.nbytes / 2**20, cache.valid.shape[1], cache.valid.shape[0],
            self.ts_scratch.nbytes / 2**20, self.ts_scratch.max_batch, self.ts_capacity,
            f"on, sub-chunks of {config.prefill_chunk}" if config.sparse_prefill else "off",
            tp, "per-rank" if self.ts_selector.group is None else "global (all-reduced)",
        )
        if self.ts_rope is not None:
            logger.info(
                "TokenSelect: length extrapolation in effect: pre-RoPE keys in the KV pool, RoPE (%s) applied "
                "in-kernel over positions in the attended list (at most %d); context length %s tokens, model "
                "trained on %s.", self.ts_rope.describe(), config.budget,
                getattr(model_runner.model_config, "context_len", "?"), self.ts_rope.max_position or "?",
            )

    @property
    def selection_cache(self) -> SelectionCache:
        return self.ts_selector.cache

    def _make_monitor(self, model_runner: "ModelRunner"):
        """The counters' reader for /metrics and /tokenselect/stats (sglang_tokenselect.server)."""
        from sglang_tokenselect.server.monitor import DecodeMonitor
        from sglang_tokenselect.server.routes import STATS_DIR_ATTR

        ps = getattr(model_runner, "ps", model_runner)  # SGLang 0.5.17: the runner's parallel state
        dp, tp, pp = (getattr(ps, f"{k}_rank", None) or 0 for k in ("dp", "tp", "pp"))
        return DecodeMonitor(self.selection_cache.counters, budget=self.ts_config.budget, rank=f"dp{dp}-tp{tp}-pp{pp}",
                             stats_dir=getattr(model_runner.server_args, STATS_DIR_ATTR, None),
                             describe=self.describe, start_layer=self.ts_start_layer)

    def describe(self) -> tuple[dict, dict]:
        """(configuration, memory bytes) for the stats report; host values only."""
        cfg = self.ts_config
        config = {"n_init": cfg.n_init, "topk": cfg.topk, "n_local": cfg.n_local, "budget": cfg.budget,
                  "cache_threshold": cfg.cache_threshold,
                  "score_scale": "layer" if cfg.score_scale is None else cfg.score_scale,
                  "vote": cfg.vote, "tp_vote": cfg.tp_vote,
                  "sparse_prefill": cfg.sparse_prefill, "prefill_chunk": cfg.prefill_chunk,
                  "extrapolate": cfg.extrapolate, "backend": type(self).__name__}
        memory = {"selection_cache": self.selection_cache.nbytes,
                  "scratch": self.ts_scratch.nbytes + sum(s.nbytes for s in self.ts_retired_scratch),
                  "scratch_candidates": self.ts_capacity, "scratch_max_batch": self.ts_scratch.max_batch}
        return config, memory

    def _alloc_scratch(self, max_batch: int):
        device = self.selection_cache.valid.device
        return self.ts_selector.ops.alloc_scratch(max_batch, self.ts_capacity, self.ts_num_heads, device)

    def _ensure_scratch_rows(self, batch: int) -> None:
        """Grow the per-request part of the scratch (never while a CUDA graph is captured:
        the graph state is initialised first, for the largest batch)."""
        if batch > self.ts_scratch.max_batch:
            # A captured graph may still point at the old scratch: keep it alive.
            self.ts_retired_scratch.append(self.ts_scratch)
            self.ts_scratch = self._alloc_scratch(batch)
            logger.info("TokenSelect: selection scratch grown to %d requests, %.1f MB",
                        batch, self.ts_scratch.nbytes / 2**20)

    def _forget_extended_rows(self, forward_batch: "ForwardBatch") -> None:
        # Every request runs an extend before its first decode, both a new owner of a
        # reused pool row and a request whose prefix came from the radix cache: start
        # its selections afresh.
        if forward_batch.req_pool_indices is not None and forward_batch.req_pool_indices.numel():
            self.selection_cache.invalidate_rows(forward_batch.req_pool_indices)

    def _plan_sparse_prefill(self, forward_batch: "ForwardBatch") -> Optional[SubchunkPlan]:
        """The sub-chunk plan of an extend when sparse prefill is on and some sub-chunk ends
        past the budget; None otherwise (the extend stays dense). Host lengths only."""
        if not self.ts_config.sparse_prefill or not forward_batch.forward_mode.is_extend():
            return None
        prefix, extend = forward_batch.extend_prefix_lens_cpu, forward_batch.extend_seq_lens_cpu
        if prefix is None or extend is None:  # not on SGLang's scheduler path: one sync
            prefix, extend = forward_batch.extend_prefix_lens.tolist(), forward_batch.extend_seq_lens.tolist()
        plan = plan_subchunks(prefix, extend, self.ts_config, capacity=self.ts_scratch.capacity,
                              max_rows=self.ts_scratch.max_batch)
        if not plan.sparse and self.ts_rope is None:  # pre-RoPE keys: every extend re-applies RoPE
            return None
        self.ts_sparse_extends += 1
        logger.debug("TokenSelect sparse extend: %d requests, %d queries, %d sub-chunks in %d selection "
                     "groups, %d attended keys per layer", len(prefix), plan.num_tokens, plan.num_rows,
                     len(plan.groups), plan.num_kv)
        return plan

    def _build_prefill_step(self, plan: Optional[SubchunkPlan], forward_batch: "ForwardBatch",
                            kv_indptr: Optional[torch.Tensor] = None,
                            kv_indices: Optional[torch.Tensor] = None) -> Optional[SparsePrefillStep]:
        if plan is None:
            return None
        cache = self.selection_cache
        return build_step(plan, self.req_to_token_pool.req_to_token, forward_batch.req_pool_indices,
                          query_width=cache.query.shape[-1], topk=self.ts_config.topk, dtype=cache.query.dtype,
                          kv_indptr=kv_indptr, kv_indices=kv_indices)

    def _select_prefill(self, q: torch.Tensor, layer: "RadixAttention") -> SparsePrefillStep:
        """This layer's selection of every sub-chunk of the current sparse extend.

        q: [>= T, H_q * D] or [>= T, H_q, D] (rows past the plan's T queries are ignored).
        The extend's own K/V must already be in the pool.
        """
        step = self.ts_prefill
        q3 = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)[: step.plan.num_tokens]
        select_subchunks(self.ts_selector.ops, step, q3, self.token_to_kv_pool.get_key_buffer(layer.layer_id),
                         self.ts_scratch, self.ts_config, self.ts_config.scale_for(layer.scaling),
                         self.ts_selector.group)
        return step

    def _rerotate(self, q: torch.Tensor, k: Optional[torch.Tensor], layer: "RadixAttention",
                  forward_batch: "ForwardBatch") -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
        """Length extrapolation: the model rotated q and k at their true positions; undo it.

        q: [T, H_q * D] (or [T, H_q, D]); k: [T, H_kv * D] or None. Returns (q_pre [T, H_q, D],
        k_pre [T, H_kv, D] or None, q_sel [T, H_q, D]: q_pre rotated to position n_local), in the
        input dtypes (``reference.extrapolation_qk_reference``). Device ops only: no sync.
        """
        q3 = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
        positions = forward_batch.positions[: q3.shape[0]]
        k3 = (k.reshape(-1, layer.tp_k_head_num, layer.qk_head_dim) if k is not None
              else q3.new_empty(q3.shape[0], 0, layer.qk_head_dim))
        rope = self.ts_rope
        if self.ts_rope_sel_tables is None:  # CPU: the PyTorch reference
            q_pre, k_pre, q_sel = ref.extrapolation_qk_reference(q3, k3, positions, theta=rope.theta,
                                                                 scale=rope.scale, n_local=self.ts_config.n_local)
        else:  # CUDA: one Triton launch each for q and k; cos/sin once per forward (its first layer)
            from sglang_tokenselect.kernels import triton_rope

            if layer.layer_id == self.ts_start_layer or self.ts_rope_tables is None:
                self.ts_rope_tables = triton_rope.rope_tables(positions, rope.head_dim, rope.theta, rope.scale)
            q_pre, k_pre, q_sel = triton_rope.extrapolation_qk(q3, k3, self.ts_rope_tables, self.ts_rope_sel_tables)
        return q_pre, (k_pre if k is not None else None), q_sel

    def _rerotate_and_store(self, q, k, v, layer: "RadixAttention", forward_batch: "ForwardBatch",
                            save_kv_cache: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's K/V (pre-RoPE under extrapolation); returns (q to attend with, q to
        select with): both the model's q, or its un-rotated form and its rotation to n_local."""
        q_sel = q
        if self.ts_rope is not None:
            q, k, q_sel = self._rerotate(q, k, layer, forward_batch)
        if save_kv_cache and k is not None and v is not None:
            self._store_kv(layer, forward_batch, k, v)
        return q, q_sel

    def _select(self, q: torch.Tensor, layer: "RadixAttention", forward_batch: "ForwardBatch") -> DecodeStep:
        step = self.ts_step
        self.ts_selector.select(
            layer.layer_id - self.ts_start_layer,
            q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim),
            self.token_to_kv_pool.get_key_buffer(layer.layer_id),
            self.req_to_token_pool.req_to_token,
            forward_batch.req_pool_indices,
            forward_batch.seq_lens,
            step.kv_indptr,
            step.kv_indices,
            self.ts_config.scale_for(layer.scaling),
            step.scratch,
        )
        return step

    def _rope_params(self) -> Optional[tuple[float, float]]:
        """``(theta, scale)`` of the in-kernel RoPE under extrapolation, else None."""
        return None if self.ts_rope is None else self.ts_rope.params

    def _count_decode_step(self, seq_lens_cpu: Optional[torch.Tensor] = None, in_capture: bool = False) -> None:
        self.ts_decode_steps += 1
        self.ts_monitor.on_decode_step(seq_lens_cpu, in_capture)  # host arithmetic only
        if self.ts_stats_interval and self.ts_decode_steps % self.ts_stats_interval == 0:
            self.log_stats()

    def log_stats(self) -> dict[str, int]:
        """Log cumulative Selection Cache counters (reads device memory: a sync)."""
        counts = self.selection_cache.counts()
        selections = counts["hits"] + counts["misses"]
        hit_rate = counts["hits"] / selections if selections else 0.0
        logger.info(
            "TokenSelect stats: decode_steps=%d selections=%d hits=%d misses=%d dense=%d overflow=%d "
            "hit_rate=%.4f", self.ts_decode_steps, selections, counts["hits"], counts["misses"],
            counts["dense"], counts["overflow"], hit_rate,
        )
        return counts


def _seq_lens_cpu(forward_batch: "ForwardBatch") -> torch.Tensor:
    """SGLang's host copy of the lengths; a sync only off its scheduler path (tests)."""
    if forward_batch.seq_lens_cpu is not None:
        return forward_batch.seq_lens_cpu
    return forward_batch.seq_lens.cpu()


class TokenSelectTorchBackend(TokenSelectDecodeMixin, TorchNativeAttnBackend):
    """CPU backend: dense SDPA extend (parent), reference TokenSelect decode."""

    def __init__(self, model_runner: "ModelRunner", config: TokenSelectConfig,
                 stats_interval: int = 0, ops: Optional[SelectionOps] = None, rope: Optional[RopeSpec] = None):
        TorchNativeAttnBackend.__init__(self, model_runner)
        self._init_tokenselect(model_runner, config, stats_interval, ops, rope)

    def init_forward_metadata(self, forward_batch: "ForwardBatch"):
        super().init_forward_metadata(forward_batch)
        if forward_batch.forward_mode.is_decode():
            self._plan_decode_step(forward_batch)
        elif forward_batch.forward_mode.is_extend():
            self._forget_extended_rows(forward_batch)
        self.ts_prefill = self._build_prefill_step(self._plan_sparse_prefill(forward_batch), forward_batch)

    def _plan_decode_step(self, forward_batch: "ForwardBatch") -> None:
        """Allocate this step's buffers, sized for this batch (eager decode)."""
        cfg = self.ts_config
        seq_lens_cpu = _seq_lens_cpu(forward_batch)
        device = forward_batch.seq_lens.device
        kv_indptr = torch.zeros(seq_lens_cpu.shape[0] + 1, dtype=torch.int32, device=device)
        kv_indptr[1:] = torch.cumsum(forward_batch.seq_lens.clamp(max=cfg.budget), 0)
        total = int(seq_lens_cpu.clamp(max=cfg.budget).sum())
        self._ensure_scratch_rows(seq_lens_cpu.shape[0])
        self.ts_step = DecodeStep(
            kv_indptr=kv_indptr,
            kv_indices=torch.empty(total, dtype=torch.int32, device=device),
            scratch=self.ts_scratch,
        )
        self._count_decode_step(seq_lens_cpu)

    def _store_kv(self, layer: "RadixAttention", forward_batch: "ForwardBatch", k, v) -> None:
        loc = KVWriteLoc(forward_batch.out_cache_loc, self.swa_out_cache_loc)
        self.token_to_kv_pool.set_kv_buffer(layer, loc, k, v)

    def forward_extend(self, q, k, v, layer: "RadixAttention", forward_batch: "ForwardBatch",
                       save_kv_cache: bool = True):
        """Dense (parent) unless this extend is sparse: then the PyTorch reference of the
        sub-chunk selection and of FlashInfer's paged prefill over it."""
        if self.ts_prefill is None or layer.is_cross_attention:
            return super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache)
        q, q_sel = self._rerotate_and_store(q, k, v, layer, forward_batch, save_kv_cache)
        step = self._select_prefill(q_sel, layer)
        q3 = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
        n = step.plan.num_tokens
        out = q3.new_zeros(q3.shape[0], layer.tp_q_head_num, layer.v_head_dim)
        out[:n] = ref.paged_prefill_attention_reference(
            q3[:n],
            self.token_to_kv_pool.get_key_buffer(layer.layer_id),
            self.token_to_kv_pool.get_value_buffer(layer.layer_id),
            step.plan.qo_indptr,
            step.kv_indptr,
            step.kv_indices,
            layer.scaling,
            layer.logit_cap,
            rope=self._rope_params(),
        )
        return out.reshape(-1, layer.tp_q_head_num * layer.v_head_dim)

    def forward_decode(self, q, k, v, layer: "RadixAttention", forward_batch: "ForwardBatch",
                       save_kv_cache: bool = True):
        q, q_sel = self._rerotate_and_store(q, k, v, layer, forward_batch, save_kv_cache)
        step = self._select(q_sel, layer, forward_batch)
        out = ref.paged_decode_attention_reference(
            q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim),
            self.token_to_kv_pool.get_key_buffer(layer.layer_id),
            self.token_to_kv_pool.get_value_buffer(layer.layer_id),
            step.kv_indptr,
            step.kv_indices,
            layer.scaling,
            layer.logit_cap,
            rope=self._rope_params(),
        )
        return out.reshape(-1, layer.tp_q_head_num * layer.v_head_dim)


@functools.lru_cache(maxsize=None)
def _flashinfer_backend_class():
    from sglang.srt.layers.attention.flashinfer_backend import FlashInferAttnBackend

    class TokenSelectFlashInferBackend(TokenSelectDecodeMixin, FlashInferAttnBackend):
        """CUDA backend: FlashInfer dense prefill (parent), FlashInfer paged decode over the selection.

        Every decode plan, eager or for a CUDA graph, goes through SGLang's decode indices
        updater, which this class makes plan ``min(L, budget)`` tokens per request. Each
        layer then overwrites the planned index buffer with its selection. One selection
        scratch, sized by the token pool, serves eager decode and every captured batch size.
        """

        def __init__(self, model_runner: "ModelRunner", config: TokenSelectConfig,
                     stats_interval: int = 0, ops: Optional[SelectionOps] = None, rope: Optional[RopeSpec] = None):
            FlashInferAttnBackend.__init__(
                self, model_runner, init_new_workspace=model_runner.init_new_workspace
            )
            self._init_tokenselect(model_runner, config, stats_interval, ops, rope)
            self._plan_budget_lengths()
            if self.ts_rope is not None:
                self._plan_decode_with_rope()

        # --- length extrapolation (NOT RUN ON A GPU YET): FlashInfer applies RoPE in-kernel
        # (pos_encoding_mode="ROPE_LLAMA", FlashInfer 0.6.x): the k listed j-th at position j, the
        # query at kv_len - 1 (decode) or kv_len - qo_len + i (paged prefill, bottom right). The
        # CPU tests check the same semantics through reference.paged_*_attention_reference(rope=).

        def _rope_kwargs(self) -> dict:
            """FlashInfer's in-kernel RoPE under extrapolation (none without it)."""
            if self.ts_rope is None:
                return {}
            return dict(pos_encoding_mode="ROPE_LLAMA", rope_scale=self.ts_rope.scale, rope_theta=self.ts_rope.theta)

        def _plan_decode_with_rope(self) -> None:
            """Every decode plan, eager or for a CUDA graph, selects FlashInfer's RoPE kernel: SGLang's
            decode updater calls ``wrapper.begin_forward(...)`` without a position encoding, so each
            wrapper's ``begin_forward`` is given ours as keywords before it runs. ``functools.partial``
            of a partial flattens, so SGLang's test for its ``fast_decode_plan`` (CUDA graph replay,
            host lengths, no sync) still sees ``.func is fast_decode_plan``."""
            updater, rope = self.indices_updater_decode, self._rope_kwargs()
            call = updater.call_begin_forward

            def call_begin_forward(wrapper, *args, **kwargs):
                begin = wrapper.begin_forward
                if getattr(begin, "keywords", {}).get("pos_encoding_mode") != "ROPE_LLAMA":
                    wrapper.begin_forward = functools.partial(begin, **rope)
                return call(wrapper, *args, **kwargs)

            updater.call_begin_forward = call_begin_forward

        def _plan_budget_lengths(self) -> None:
            updater, budget = self.indices_updater_decode, self.ts_config.budget
            plan = updater.update

            def update(req_pool_indices, seq_lens, seq_lens_cpu, seq_lens_sum, *args, **kwargs):
                lens = seq_lens.clamp(max=budget)
                if seq_lens_cpu is not None:
                    lens_cpu = seq_lens_cpu.clamp(max=budget)
                    total = int(lens_cpu.sum())
                else:  # not on SGLang's scheduler path; costs one sync
                    lens_cpu, total = None, int(lens.sum())
                return plan(req_pool_indices, lens, lens_cpu, total, *args, **kwargs)

            updater.update = update

        def init_forward_metadata(self, forward_batch: "ForwardBatch"):
            if forward_batch.forward_mode.is_extend():
                self._forget_extended_rows(forward_batch)
            super().init_forward_metadata(forward_batch)
            if forward_batch.forward_mode.is_decode():
                self._ensure_scratch_rows(forward_batch.batch_size)
                self._bind_planned_step(self.forward_metadata.decode_wrappers[0], forward_batch)
            self.ts_prefill = self._plan_sparse_prefill_wrapper(forward_batch)

        # --- sparse prefill (NOT RUN ON A GPU YET: written against FlashInfer's paged prefill
        # API as SGLang 0.5.17 uses it; the index arithmetic and the selection are the ones the
        # CPU tests check through TokenSelectTorchBackend and Triton's interpreter) ---------

        def _ts_prefill_wrapper(self):
            """A paged prefill wrapper of our own on SGLang's workspace, created on first use."""
            wrapper = getattr(self, "_ts_prefill_wrapper_obj", None)
            if wrapper is None:
                from flashinfer import BatchPrefillWithPagedKVCacheWrapper

                # FlashInfer's in-kernel RoPE is fa2's (fa3 has none)
                backend = "fa2" if self.ts_rope is not None else self.prefill_backend
                wrapper = BatchPrefillWithPagedKVCacheWrapper(self.workspace_buffer, "NHD", backend=backend)
                self._ts_prefill_wrapper_obj = wrapper
            return wrapper

        def _plan_sparse_prefill_wrapper(self, forward_batch: "ForwardBatch") -> Optional[SparsePrefillStep]:
            """Plan one paged prefill (page size 1, causal) over all sub-chunks of a sparse
            extend: ``min(e, budget)`` keys each, whose slots every layer writes into the planned
            index buffer. The index pointers and last page lengths are host tensors (FlashInfer
            reads them on the host and copies them to the device): no synchronisation."""
            plan = self._plan_sparse_prefill(forward_batch)
            if plan is None:
                return None
            device = forward_batch.seq_lens.device
            updater = self.indices_updater_prefill
            wrapper = self._ts_prefill_wrapper()
            wrapper.begin_forward(
                plan.qo_indptr, plan.kv_indptr,
                torch.empty(plan.num_kv, dtype=torch.int32, device=device),
                torch.ones(plan.num_rows, dtype=torch.int32),  # last page lengths, on the host like the indptrs
                updater.num_qo_heads, updater.num_kv_heads, updater.head_dim, 1,
                causal=True, q_data_type=updater.q_data_type, kv_data_type=updater.data_type,
                non_blocking=True, **self._rope_kwargs(),
            )
            return self._build_prefill_step(plan, forward_batch, kv_indptr=wrapper._paged_kv_indptr_buf,
                                            kv_indices=wrapper._paged_kv_indices_buf)

        def _store_kv(self, layer: "RadixAttention", forward_batch: "ForwardBatch", k, v) -> None:
            self.token_to_kv_pool.set_kv_buffer(layer, KVWriteLoc(forward_batch.out_cache_loc, None), k, v,
                                                *self._kv_write_scales(layer))

        def forward_extend(self, q, k, v, layer: "RadixAttention", forward_batch: "ForwardBatch",
                           save_kv_cache: bool = True):
            if self.ts_prefill is None or layer.is_cross_attention:
                return super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache)
            q, q_sel = self._rerotate_and_store(q, k, v, layer, forward_batch, save_kv_cache)
            step = self._select_prefill(q_sel, layer)
            n = step.plan.num_tokens
            q3 = q.reshape(-1, layer.tp_q_head_num, layer.head_dim)
            o = self._ts_prefill_wrapper().forward(
                q3[:n].contiguous(), self.token_to_kv_pool.get_kv_buffer(layer.layer_id), causal=True,
                sm_scale=layer.scaling, logits_soft_cap=layer.logit_cap,
                k_scale=layer.k_scale_float, v_scale=layer.v_scale_float,
                **self._rope_kwargs(),
            )
            if n < q3.shape[0]:  # padded query rows (none expected: prefill CUDA graphs are off)
                o = torch.cat([o, o.new_zeros((q3.shape[0] - n,) + tuple(o.shape[1:]))])
            return o.view(-1, layer.tp_q_head_num * layer.head_dim)

        def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int, kv_indices_buf=None):
            super().init_cuda_graph_state(max_bs, max_num_tokens, kv_indices_buf)
            self._ensure_scratch_rows(max_bs)

        def init_forward_metadata_out_graph(self, forward_batch: "ForwardBatch", in_capture: bool = False):
            self.ts_prefill = None  # a prefill CUDA graph runs its extends dense
            if forward_batch.forward_mode.is_extend():
                self._forget_extended_rows(forward_batch)
            super().init_forward_metadata_out_graph(forward_batch, in_capture)
            if forward_batch.forward_mode.is_decode():
                bs = forward_batch.batch_size
                self._bind_planned_step(self.decode_cuda_graph_metadata[bs][0], forward_batch, in_capture)

        def _bind_planned_step(self, wrapper, forward_batch: "ForwardBatch", in_capture: bool = False) -> None:
            """Point this step's selection at the index buffers FlashInfer was just planned with."""
            bs = forward_batch.batch_size
            self.ts_step = DecodeStep(
                kv_indptr=wrapper._paged_kv_indptr_buf[: bs + 1],
                kv_indices=wrapper._paged_kv_indices_buf,
                scratch=self.ts_scratch,
            )
            self._count_decode_step(forward_batch.seq_lens_cpu, in_capture)

        def forward_decode(self, q, k, v, layer: "RadixAttention", forward_batch: "ForwardBatch",
                           save_kv_cache: bool = True):
            if self.ts_rope is not None:
                return self._forward_decode_extrapolated(q, k, v, layer, forward_batch, save_kv_cache)
            # The current token is always local, never a candidate: selecting before the
            # parent writes its K/V is safe.
            self._select(q, layer, forward_batch)
            return super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache)

        def _forward_decode_extrapolated(self, q, k, v, layer: "RadixAttention", forward_batch: "ForwardBatch",
                                         save_kv_cache: bool = True):
            """Pre-RoPE K into the pool, selection with q rotated to n_local, FlashInfer decode with
            in-kernel RoPE on the pre-RoPE q (the parent's call would reset the RoPE parameters)."""
            q_pre, q_sel = self._rerotate_and_store(q, k, v, layer, forward_batch, save_kv_cache)
            self._select(q_sel, layer, forward_batch)  # the current token is local: storing first is safe
            wrapper = self.forward_metadata.decode_wrappers[0]
            o = wrapper.forward(
                q_pre.contiguous(), self.token_to_kv_pool.get_kv_buffer(layer.layer_id),
                sm_scale=layer.scaling, logits_soft_cap=layer.logit_cap,
                k_scale=layer.k_scale_float, v_scale=layer.v_scale_float, **self._rope_kwargs(),
            )
            return o.view(-1, layer.tp_q_head_num * layer.head_dim)

    return TokenSelectFlashInferBackend


def create_tokenselect_backend(model_runner: "ModelRunner"):
    """Factory registered as ``--attention-backend tokenselect``."""
    from sglang_tokenselect.server_args import config_from_server_args, stats_interval_from_server_args

    config = config_from_server_args(model_runner.server_args)
    interval = stats_interval_from_server_args(model_runner.server_args)
    if torch.device(model_runner.device).type == "cuda":
        return _flashinfer_backend_class()(model_runner, config, interval)
    return TokenSelectTorchBackend(model_runner, config, interval)

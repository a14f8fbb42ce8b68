"""CPU reference path: TokenSelect decode as a Hugging Face transformers attention function.

:func:`register` adds ``"tokenselect"`` to transformers' ``AttentionInterface`` (and the
matching mask builder, SDPA's, to ``AttentionMaskInterface``); load a model with
``attn_implementation="tokenselect"`` and attach a :class:`TokenSelectSession`:

    register()
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="tokenselect")
    session = TokenSelectSession(TokenSelectConfig(n_init=16, n_local=64, topk=64))
    text = generate(model, tokenizer, messages, session=session)   # session=None: dense
    session.summary()  # attended fraction, Selection Cache hit rate, per layer

Prefill (``q_len > 1``) and layers without a session run transformers' own SDPA
attention. Single-token decode runs the runtime's own selection step: the layer's KV cache
is viewed as a paged cache with one pool row per request (slot = ``b * L + position``; padded
positions are skipped), ``selection.Selector`` with ``TorchSelectionOps`` writes the attended
slots, and ``paged_decode_attention_reference`` attends them. The Selection Cache is the
runtime's ``SelectionCache`` (one per layer, a row per request), so its rules are the
server's: a valid cached selection is reused while ``cos(q, cached q) >= cache_threshold``
(1.0 never reuses, -1 always does); a hit does not refresh the cached query, so a slowly
drifting query eventually misses. A prefill of a layer forgets that layer's cache (a new
sequence).

Positions are logical positions within each request: with left padding (batched
``generate`` with an attention mask), padded slots are removed before selecting, so
``n_init`` counts from the first real token.

Length extrapolation (``TokenSelectConfig(extrapolate=True, sparse_prefill=True)``): the
session takes the model's RoPE from its config (``rope.rope_spec_of_hf_config``: plain or
linear RoPE only), and :func:`prefill` runs the prompt in chunks of ``prefill_chunk`` tokens
through the sparse prefill. In every layer, the keys transformers cached (rotated at their
true positions) and the queries are un-rotated in float32, the selection scores the query
rotated to position ``n_local`` against pre-RoPE keys, and the attention re-applies RoPE over
positions in the attended list (``reference.paged_*_attention_reference(rope=...)``, the
semantics of FlashInfer's ``ROPE_LLAMA``), so no position exceeds the budget.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch

from sglang_tokenselect.config import TokenSelectConfig
from sglang_tokenselect.kernels import reference as ref
from sglang_tokenselect.kernels.reference import (
    COUNTERS,
    kv_indptr_reference,
    paged_decode_attention_reference,
)
from sglang_tokenselect.rope import RopeSpec, check_budget_within_window, rope_spec_of_hf_config
from sglang_tokenselect.selection import SelectionCache, Selector, TorchSelectionOps

logger = logging.getLogger(__name__)

ATTN_IMPLEMENTATION = "tokenselect"
SESSION_ATTR = "tokenselect_session"


@dataclass
class LayerStats:
    """Counters of one layer, summed over decode steps and requests."""

    dense_steps: int = 0  # context within the budget: everything attended
    sparse_steps: int = 0  # a selection was attended
    hits: int = 0  # sparse steps that reused the cached selection
    misses: int = 0  # sparse steps that computed a new selection
    attended: int = 0  # tokens attended
    context: int = 0  # tokens in context

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0

    @property
    def attended_fraction(self) -> float:
        return self.attended / self.context if self.context else 0.0


@dataclass
class PagedView:
    """A batch's decode keys and values laid out as SGLang's paged KV cache (one row per request)."""

    k_buffer: torch.Tensor  # [B * L, H_kv, D]
    v_buffer: torch.Tensor  # [B * L, H_kv, Dv]
    req_to_token: torch.Tensor  # [B, L] int32: logical position -> slot
    seq_lens: torch.Tensor  # [B] int64: real (unpadded) tokens per request

    @classmethod
    def of(cls, key: torch.Tensor, value: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> "PagedView":
        """key/value [B, H_kv, L, D] (transformers' layout); padded positions are left out."""
        bsz, _, length, _ = key.shape
        req_to_token = torch.zeros(bsz, length, dtype=torch.int32, device=key.device)
        seq_lens = torch.empty(bsz, dtype=torch.long, device=key.device)
        for b in range(bsz):
            slots = b * length + _valid_positions(attention_mask, b, length, key.device)
            req_to_token[b, : slots.numel()] = slots.to(torch.int32)
            seq_lens[b] = slots.numel()
        return cls(
            k_buffer=key.transpose(1, 2).reshape(bsz * length, key.shape[1], key.shape[3]),
            v_buffer=value.transpose(1, 2).reshape(bsz * length, value.shape[1], value.shape[3]),
            req_to_token=req_to_token,
            seq_lens=seq_lens,
        )


class TokenSelectSession:
    """Per-model TokenSelect state: config, Selection Cache and counters of every layer.

    Attach it with :func:`attach_session` (or pass it to :func:`generate`); call
    :meth:`reset` before each new generation (``generate`` does).
    """

    def __init__(self, config: TokenSelectConfig, *, enabled: bool = True, rope: Optional[RopeSpec] = None):
        self.config = config
        self.enabled = enabled
        self.rope = rope  # with config.extrapolate: the model's RoPE (attach_session reads it from the config)
        self.layers: dict[int, LayerStats] = {}
        self._selectors: dict[int, Selector] = {}
        self._ops = TorchSelectionOps()

    def reset(self) -> None:
        self.layers.clear()
        self._selectors.clear()

    # ------------------------------------------------------------------ statistics
    def totals(self) -> LayerStats:
        t = LayerStats()
        for s in self.layers.values():
            for name in vars(t):
                setattr(t, name, getattr(t, name) + getattr(s, name))
        return t

    def summary(self) -> dict[str, Any]:
        t = self.totals()
        return {
            "config": dataclasses.asdict(self.config),
            "attended_fraction": t.attended_fraction,
            "hit_rate": t.hit_rate,
            "hits": t.hits,
            "misses": t.misses,
            "sparse_steps": t.sparse_steps,
            "dense_steps": t.dense_steps,
            "per_layer": {
                i: {"hits": s.hits, "misses": s.misses, "attended_fraction": s.attended_fraction}
                for i, s in sorted(self.layers.items())
            },
        }

    # ------------------------------------------------------------------ attention
    def forget_layer(self, layer: int) -> None:
        self._selectors.pop(layer, None)

    def _selector(self, layer: int, batch: int, query_width: int, device) -> Selector:
        """The layer's Selector over a one-layer SelectionCache with a row per request; a new
        one (empty cache) when the batch or the query width changed."""
        selector = self._selectors.get(layer)
        cache = selector.cache if selector is not None else None
        if cache is None or cache.query.shape[1:] != (batch, query_width) or cache.query.device != torch.device(device):
            cache = SelectionCache.allocate(num_layers=1, num_rows=batch, query_width=query_width,
                                            topk=self.config.topk, dtype=torch.float32, device=device)
            selector = Selector(self.config, cache, self._ops)
            self._selectors[layer] = selector
        return selector

    def decode_attention(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        scaling: Optional[float],
    ) -> torch.Tensor:
        """One decode token: query [B, H_q, 1, D], key/value [B, H_kv, L, D] (current last).

        Returns [B, 1, H_q, Dv] like transformers' attention functions.
        """
        bsz, n_heads, q_len, head_dim = query.shape
        if q_len != 1:
            raise ValueError("decode_attention takes one query token per request")
        layer = int(getattr(module, "layer_idx", 0))
        attn_scale = float(scaling if scaling is not None else module.scaling)
        cfg = self.config
        view = PagedView.of(key, value, attention_mask)
        q = q_sel = query[:, :, 0, :]  # [B, H_q, D]
        rope = None
        if cfg.extrapolate:
            view = self._pre_rope_view(view)
            q, q_sel = self._pre_rope_queries(q, view.seq_lens - 1)
            rope = self.rope.params
        kv_indptr = kv_indptr_reference(view.seq_lens, n_init=cfg.n_init, n_local=cfg.n_local, topk=cfg.topk)
        kv_indices = torch.empty(int(kv_indptr[-1]), dtype=torch.int32, device=query.device)
        selector = self._selector(layer, bsz, n_heads * head_dim, query.device)
        before = selector.cache.counts()
        selector.select(0, q_sel, view.k_buffer, view.req_to_token, torch.arange(bsz, device=query.device),
                        view.seq_lens, kv_indptr, kv_indices, cfg.scale_for(attn_scale),
                        self._ops.alloc_scratch(bsz, None, n_heads, query.device))
        self._count(layer, before, selector.cache.counts(), kv_indptr, view.seq_lens)
        out = paged_decode_attention_reference(q, view.k_buffer, view.v_buffer, kv_indptr, kv_indices, attn_scale,
                                               rope=rope)
        return out[:, None]

    # ------------------------------------------------------------------ length extrapolation
    def _pre_rope_view(self, view: PagedView) -> PagedView:
        """The view with its keys un-rotated: slot ``req_to_token[b, p]`` was rotated at position p."""
        positions = torch.zeros(view.k_buffer.shape[0], dtype=torch.long, device=view.k_buffer.device)
        for b, n in enumerate(view.seq_lens.tolist()):
            positions[view.req_to_token[b, :n].long()] = torch.arange(n, device=positions.device)
        keys = ref.rope_unrotate_reference(view.k_buffer, positions, *self.rope.params).to(view.k_buffer.dtype)
        return dataclasses.replace(view, k_buffer=keys)

    def _pre_rope_queries(self, q: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, H_q, D] rotated at positions [T] -> (q_pre, q_sel), as the backend computes them."""
        q_pre, _, q_sel = ref.extrapolation_qk_reference(q, q[:, :0], positions, theta=self.rope.theta,
                                                         scale=self.rope.scale, n_local=self.config.n_local)
        return q_pre, q_sel

    def prefill_attention(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                          value: torch.Tensor, attention_mask: Optional[torch.Tensor],
                          scaling: Optional[float]) -> torch.Tensor:
        """Sparse prefill of one request's chunk under extrapolation (the runtime's sub-chunk rule,
        ``reference.sparse_prefill_select_reference``, over pre-RoPE keys).

        query [1, H_q, T, D] (the chunk, at positions L - T .. L - 1), key/value [1, H_kv, L, D].
        Returns [1, T, H_q, Dv].
        """
        if query.shape[0] != 1 or (attention_mask is not None and _valid_positions(
                attention_mask, 0, key.shape[2], key.device).numel() != key.shape[2]):
            raise ValueError("length extrapolation prefills one unpadded request at a time")
        cfg, t = self.config, query.shape[2]
        attn_scale = float(scaling if scaling is not None else module.scaling)
        view = self._pre_rope_view(PagedView.of(key, value, None))
        length = int(view.seq_lens[0])
        q_pre, q_sel = self._pre_rope_queries(query[0].transpose(0, 1), torch.arange(length - t, length))
        rows = torch.zeros(1, dtype=torch.long)
        qo_indptr, kv_indptr, kv_indices = ref.sparse_prefill_select_reference(
            q_sel, view.k_buffer, view.req_to_token, rows, [length - t], [t], chunk=cfg.prefill_chunk,
            n_init=cfg.n_init, n_local=cfg.n_local, topk=cfg.topk, scale=cfg.scale_for(attn_scale), vote=cfg.vote)
        out = ref.paged_prefill_attention_reference(q_pre, view.k_buffer, view.v_buffer, qo_indptr, kv_indptr,
                                                    kv_indices, attn_scale, rope=self.rope.params)
        return out[None]

    def _count(self, layer: int, before: dict, after: dict, kv_indptr: torch.Tensor, seq_lens: torch.Tensor) -> None:
        step = {name: after[name] - before[name] for name in COUNTERS}
        stats = self.layers.setdefault(layer, LayerStats())
        stats.hits += step["hits"]
        stats.misses += step["misses"]
        stats.sparse_steps += step["hits"] + step["misses"]
        stats.dense_steps += step["dense"]
        stats.attended += int(kv_indptr[-1])
        stats.context += int(seq_lens.sum())


def _valid_positions(mask: Optional[torch.Tensor], b: int, kv_len: int, device) -> torch.Tensor:
    """Indices of the non-padded key positions of request b."""
    if mask is None:
        return torch.arange(kv_len, device=device)
    row = mask[b].reshape(-1, mask.shape[-1])[-1][-kv_len:]
    keep = row if row.dtype == torch.bool else row == 0
    return keep.nonzero().squeeze(-1)


def tokenselect_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: dense SDPA for prefill, TokenSelect for decode."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    session: Optional[TokenSelectSession] = getattr(module, SESSION_ATTR, None)
    if session is None or not session.enabled:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if query.shape[2] != 1:
        session.forget_layer(int(getattr(module, "layer_idx", 0)))
        if session.config.extrapolate:
            return session.prefill_attention(module, query, key, value, attention_mask, scaling), None
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    return session.decode_attention(module, query, key, value, attention_mask, scaling), None


def register() -> str:
    """Register ``"tokenselect"`` with transformers (idempotent); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, tokenselect_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    return ATTN_IMPLEMENTATION


def _attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    mods = [
        m for m in model.modules()
        if hasattr(m, "layer_idx") and type(m).__name__.endswith("Attention")
    ]
    if not mods:
        raise ValueError(f"no attention modules with a layer_idx found in {type(model).__name__}")
    return mods


def attach_session(model: torch.nn.Module, session: Optional[TokenSelectSession]) -> None:
    """Point every attention layer of ``model`` at ``session`` (None: dense attention)."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if session is not None and impl != ATTN_IMPLEMENTATION:
        raise ValueError(
            f"model uses attn_implementation={impl!r}; load it with "
            f"attn_implementation={ATTN_IMPLEMENTATION!r} after register()"
        )
    if session is not None and session.config.extrapolate and session.rope is None:
        session.rope = rope_spec_of_hf_config(model.config)  # refuses RoPE FlashInfer cannot apply
        check_budget_within_window(session.rope, session.config.budget)
    for m in _attention_modules(model):
        m.__dict__[SESSION_ATTR] = session
    model.__dict__[SESSION_ATTR] = session


@contextlib.contextmanager
def attached(model: torch.nn.Module, session: Optional[TokenSelectSession]) -> Iterator[None]:
    previous = model.__dict__.get(SESSION_ATTR)
    attach_session(model, session)
    try:
        yield
    finally:
        attach_session(model, previous)


@dataclass
class PrefilledPrompt:
    """A chat prompt after its (dense) prefill: the KV cache and the greedy first token.

    TokenSelect prefills densely, so one prefill serves dense and TokenSelect decoding alike;
    :func:`decode` copies the cache, so a prompt can be decoded any number of times.
    """

    cache: Any  # transformers' Cache after the prompt
    first_token: int  # greedy token after the prompt
    length: int  # prompt tokens


@torch.inference_mode()
def prefill(model, tokenizer, messages: list[dict[str, str]], *,
            session: Optional[TokenSelectSession] = None) -> PrefilledPrompt:
    """Prefill of ``messages`` (chat template, generation prompt) on ``model``: dense, or with a
    session whose config extrapolates, sparse in chunks of ``prefill_chunk`` tokens (the grid of
    the sub-chunks, so each chunk is one sub-chunk)."""
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"].to(model.device)
    if session is None or not session.config.extrapolate:
        with attached(model, None):
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        return PrefilledPrompt(out.past_key_values, int(out.logits[0, -1].argmax()), ids.shape[1])
    session.reset()
    cache, chunk = None, session.config.prefill_chunk
    with attached(model, session):
        for start in range(0, ids.shape[1], chunk):
            out = model(input_ids=ids[:, start : start + chunk], past_key_values=cache, use_cache=True,
                        logits_to_keep=1)
            cache = out.past_key_values
    logger.info("tokenselect: %d prompt tokens prefilled sparsely in chunks of %d (extrapolation, %s)",
                ids.shape[1], chunk, session.rope.describe())
    return PrefilledPrompt(cache, int(out.logits[0, -1].argmax()), ids.shape[1])


@torch.inference_mode()
def decode(
    model,
    tokenizer,
    prompt: PrefilledPrompt,
    *,
    session: Optional[TokenSelectSession] = None,
    max_new_tokens: int = 24,
) -> str:
    """Greedy continuation of ``prompt``; TokenSelect decode when ``session`` is given.

    The session is reset first, so its counters describe this generation only.
    """
    if session is not None:
        session.reset()
    cache = copy.deepcopy(prompt.cache)
    tokens = [prompt.first_token]
    stop = _eos_ids(model)
    with attached(model, session):
        while len(tokens) < max_new_tokens and tokens[-1] not in stop:
            step = torch.tensor([[tokens[-1]]], device=model.device)
            out = model(input_ids=step, past_key_values=cache, use_cache=True)
            tokens.append(int(out.logits[0, -1].argmax()))
    if session is not None:
        t = session.totals()
        logger.info(
            "tokenselect: %d prompt tokens, attended %.1f%%, cache hit rate %.1f%% (%d/%d)",
            prompt.length, 100 * t.attended_fraction, 100 * t.hit_rate, t.hits, t.hits + t.misses,
        )
    return tokenizer.decode(tokens, skip_special_tokens=True)


def _eos_ids(model) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    return set() if eos is None else {eos} if isinstance(eos, int) else set(eos)


def generate(
    model,
    tokenizer,
    messages: list[dict[str, str]],
    *,
    session: Optional[TokenSelectSession] = None,
    max_new_tokens: int = 24,
) -> str:
    """Greedy chat completion of ``messages`` (:func:`prefill`, then :func:`decode`)."""
    return decode(model, tokenizer, prefill(model, tokenizer, messages, session=session), session=session,
                  max_new_tokens=max_new_tokens)

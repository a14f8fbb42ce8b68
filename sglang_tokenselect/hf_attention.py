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
attention. Single-token decode runs the selection of ``kernels/reference.py``
(``vote_scores_reference`` -> ``topk_positions_reference`` -> ``selection_positions``)
and attends the selected positions with ``paged_decode_attention_reference``; the layer's
KV cache is viewed as a one-request paged cache with identity slot mapping.

Selection Cache (per layer and per request): the query of the last *computed* selection
(all heads flattened) and its top-k positions. The next decode step reuses that top-k
when ``selection_cache_hits_reference`` says so (``cos >= cache_threshold``; a threshold
of 1.0 never reuses), attending ``[0, n_init) + cached top-k + the current local
window``; otherwise it recomputes and refreshes the cache. A hit does not refresh the
cached query, so a slowly drifting query eventually misses. A prefill of a layer drops
that layer's cache (a new sequence).

Positions are logical positions within each request: with left padding (batched
``generate`` with an attention mask), padded slots are removed before selecting, so
``n_init`` counts from the first real token.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch

from sglang_tokenselect.config import TokenSelectConfig
from sglang_tokenselect.kernels.reference import (
    is_sparse,
    paged_decode_attention_reference,
    selection_cache_hits_reference,
    selection_positions,
    topk_positions_reference,
    vote_scores_reference,
)

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
class _LayerCache:
    q: torch.Tensor  # [B, H_q * D] float32, query of the last computed selection
    topk: torch.Tensor  # [B, topk] int64 logical positions
    valid: torch.Tensor  # [B] bool


class TokenSelectSession:
    """Per-model TokenSelect state: config, Selection Cache and counters of every layer.

    Attach it with :func:`attach_session` (or pass it to :func:`generate`); call
    :meth:`reset` before each new generation (``generate`` does).
    """

    def __init__(self, config: TokenSelectConfig, *, enabled: bool = True):
        self.config = config
        self.enabled = enabled
        self.layers: dict[int, LayerStats] = {}
        self._cache: dict[int, _LayerCache] = {}

    def reset(self) -> None:
        self.layers.clear()
        self._cache.clear()

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
        self._cache.pop(layer, None)

    def _layer_cache(self, layer: int, batch: int, width: int, device) -> _LayerCache:
        c = self._cache.get(layer)
        if c is None or c.q.shape != (batch, width) or c.q.device != torch.device(device):
            c = _LayerCache(
                q=torch.zeros(batch, width, dtype=torch.float32, device=device),
                topk=torch.full((batch, self.config.topk), -1, dtype=torch.long, device=device),
                valid=torch.zeros(batch, dtype=torch.bool, device=device),
            )
            self._cache[layer] = c
        return c

    def _select(self, cache: _LayerCache, b: int, q: torch.Tensor, keys: torch.Tensor,
                scale: float, stats: LayerStats) -> torch.Tensor:
        """Logical positions attended by request ``b`` (q [H_q, D], keys [n, H_kv, D])."""
        cfg = self.config
        n = keys.shape[0]
        seq = torch.tensor([n], device=keys.device)
        if not bool(is_sparse(seq, cfg.n_init, cfg.n_local, cfg.topk)[0]):
            stats.dense_steps += 1
            return torch.arange(n, device=keys.device)
        stats.sparse_steps += 1
        q_flat = q.reshape(1, -1).float()
        hit = bool(
            selection_cache_hits_reference(
                q_flat, cache.q[b : b + 1], cache.valid[b : b + 1], cfg.cache_threshold
            )[0]
        )
        if hit:
            stats.hits += 1
            topk = cache.topk[b]
        else:
            stats.misses += 1
            votes = vote_scores_reference(
                q[None],
                keys,
                torch.arange(n, device=keys.device)[None],
                torch.zeros(1, dtype=torch.long, device=keys.device),
                seq,
                n_init=cfg.n_init,
                n_local=cfg.n_local,
                scale=scale,
                vote=cfg.vote,
            )
            topk = topk_positions_reference(
                votes, seq, n_init=cfg.n_init, n_local=cfg.n_local, topk=cfg.topk
            )[0].long()
            cache.q[b] = q_flat[0]
            cache.topk[b] = topk
            cache.valid[b] = True
        return selection_positions(topk, n, n_init=cfg.n_init, n_local=cfg.n_local, topk=cfg.topk)

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
        sel_scale = self.config.scale_for(attn_scale)
        stats = self.layers.setdefault(layer, LayerStats())
        cache = self._layer_cache(layer, bsz, n_heads * head_dim, query.device)
        out = query.new_empty(bsz, 1, n_heads, value.shape[-1])
        for b in range(bsz):
            keys = key[b].transpose(0, 1)  # [L, H_kv, D]: a paged cache with slot == position
            values = value[b].transpose(0, 1)
            valid = _valid_positions(attention_mask, b, key.shape[2])
            if valid is not None:
                keys, values = keys[valid], values[valid]
            q = query[b, :, 0, :]  # [H_q, D]
            pos = self._select(cache, b, q, keys, sel_scale, stats)
            indptr = torch.tensor([0, pos.numel()], dtype=torch.int32, device=query.device)
            out[b, 0] = paged_decode_attention_reference(q[None], keys, values, indptr, pos, attn_scale)[0]
            stats.attended += pos.numel()
            stats.context += keys.shape[0]
        return out


def _valid_positions(mask: Optional[torch.Tensor], b: int, kv_len: int) -> Optional[torch.Tensor]:
    """Indices of the non-padded key positions of request b, or None when all are valid."""
    if mask is None:
        return None
    row = mask[b].reshape(-1, mask.shape[-1])[-1][-kv_len:]
    keep = row if row.dtype == torch.bool else row == 0
    if bool(keep.all()):
        return None
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


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    messages: list[dict[str, str]],
    *,
    session: Optional[TokenSelectSession] = None,
    max_new_tokens: int = 24,
) -> str:
    """Greedy chat completion of ``messages``; TokenSelect decode when ``session`` is given.

    The session is reset first, so its counters describe this generation only.
    """
    enc = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    enc = {k: v.to(model.device) for k, v in enc.items()}
    if session is not None:
        session.reset()
    with attached(model, session):
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=tokenizer.pad_token_id,
        )
    prompt_len = enc["input_ids"].shape[1]
    if session is not None:
        t = session.totals()
        logger.info(
            "tokenselect: %d prompt tokens, attended %.1f%%, cache hit rate %.1f%% (%d/%d)",
            prompt_len, 100 * t.attended_fraction, 100 * t.hit_rate, t.hits, t.hits + t.misses,
        )
    return tokenizer.decode(out[0, prompt_len:], skip_special_tokens=True)

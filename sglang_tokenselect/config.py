"""TokenSelect configuration: one frozen dataclass shared by every path."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

Vote = Literal["soft", "sum"]
VOTES: tuple[str, ...] = ("soft", "sum")
TP_VOTES: tuple[str, ...] = ("global", "local")


@dataclass(frozen=True)
class TokenSelectConfig:
    """Budget and selection rule of one TokenSelect decode step.

    Attributes:
        n_init: leading tokens always attended (attention sinks).
        n_local: trailing tokens always attended, the current token included.
        topk: critical tokens chosen among positions ``[n_init, L - n_local)``.
        cache_threshold: Selection Cache reuse threshold on the cosine between the
            current and the cached query (all heads flattened), in [-1, 1]. 1 turns the
            cache off (every step selects afresh); -1 selects once per request and reuses
            that selection for the rest of it (static selection, the bound of what the cache
            can save).
        score_scale: ``c`` in ``softmax(c * q.k)``; ``None`` means the layer's own
            attention scale (1/sqrt(d) for most models).
        vote: ``"soft"`` = head soft vote (sum over heads of per-head softmax, the
            paper's method); ``"sum"`` = plain top-k on the head-summed raw scores
            (the ablation baseline).
        sparse_prefill: chunk-wise sparse prefill: each sub-chunk of ``prefill_chunk``
            queries of an extend attends ``n_init`` + the top-k of its mean query's vote +
            its last ``n_local`` tokens (off: prefill and extend are dense).
        prefill_chunk: sub-chunk size ``c``, in queries, on absolute positions; with
            ``sparse_prefill`` it must not exceed ``n_local`` (a sub-chunk's own queries are
            local).
        extrapolate: length extrapolation (the paper's): the KV pool holds pre-RoPE keys,
            attention applies RoPE in-kernel over positions in the attended list (so they stay
            below the budget however long the context), the selection scores the query rotated
            to position ``n_local`` against pre-RoPE keys. Needs ``sparse_prefill`` (a prompt
            past the model's window must be prefilled over its selections).
        tp_vote: under attention tensor parallelism, ``"global"`` sums the ranks' partial
            votes and cache cosines (every rank attends the same tokens, the paper's method);
            ``"local"`` votes over each rank's own heads (ranks may select differently).
    """

    n_init: int = 128
    n_local: int = 512
    topk: int = 2048
    cache_threshold: float = 0.9
    score_scale: Optional[float] = 1.0
    vote: Vote = "soft"
    sparse_prefill: bool = False
    prefill_chunk: int = 512
    extrapolate: bool = False
    tp_vote: str = "global"

    def __post_init__(self) -> None:
        validate_config(self)

    @property
    def budget(self) -> int:
        """Tokens attended per request once the context exceeds the budget."""
        return self.n_init + self.topk + self.n_local

    @property
    def cache_enabled(self) -> bool:
        return self.cache_threshold < 1.0

    def scale_for(self, layer_scaling: float) -> float:
        return layer_scaling if self.score_scale is None else self.score_scale


def validate_config(cfg: TokenSelectConfig) -> None:
    """Raise ValueError naming the CLI option of the first bad field."""
    if not isinstance(cfg.n_init, int) or cfg.n_init < 0:
        raise ValueError(f"--tokenselect-n-init must be an integer >= 0, got {cfg.n_init!r}")
    if not isinstance(cfg.n_local, int) or cfg.n_local < 1:
        raise ValueError(
            f"--tokenselect-n-local must be an integer >= 1 (the current token is "
            f"always local), got {cfg.n_local!r}"
        )
    if not isinstance(cfg.topk, int) or cfg.topk < 1:
        raise ValueError(f"--tokenselect-topk must be an integer >= 1, got {cfg.topk!r}")
    th = cfg.cache_threshold
    if not isinstance(th, (int, float)) or math.isnan(th) or not -1.0 <= th <= 1.0:
        raise ValueError(
            f"--tokenselect-cache-threshold must be in [-1, 1] (1 selects at every step, "
            f"-1 selects once per request), got {th!r}"
        )
    sc = cfg.score_scale
    if sc is not None and (
        not isinstance(sc, (int, float)) or not math.isfinite(sc) or sc <= 0
    ):
        raise ValueError(
            f"--tokenselect-score-scale must be a positive number or 'layer', got {sc!r}"
        )
    if cfg.vote not in VOTES:
        raise ValueError(f"--tokenselect-vote must be one of {VOTES}, got {cfg.vote!r}")
    if cfg.tp_vote not in TP_VOTES:
        raise ValueError(f"--tokenselect-tp-vote must be one of {TP_VOTES}, got {cfg.tp_vote!r}")
    if not isinstance(cfg.prefill_chunk, int) or cfg.prefill_chunk < 1:
        raise ValueError(f"--tokenselect-prefill-chunk must be an integer >= 1, got {cfg.prefill_chunk!r}")
    if cfg.sparse_prefill and cfg.n_local < cfg.prefill_chunk:
        raise ValueError(
            f"--tokenselect-sparse-prefill needs --tokenselect-n-local ({cfg.n_local}) >= "
            f"--tokenselect-prefill-chunk ({cfg.prefill_chunk}): a sub-chunk's queries must lie in its local window"
        )
    if cfg.extrapolate and not cfg.sparse_prefill:
        raise ValueError(
            "--tokenselect-extrapolate needs --tokenselect-sparse-prefill: a prompt past the model's window must be "
            "prefilled over its selections (dense prefill would place keys at positions it was not trained on)"
        )


def gpu_tp_vote_refusal(cfg: TokenSelectConfig, attn_tp_size: int) -> Optional[str]:
    """Why the GPU path (the Triton kernels, no all-reduce yet) cannot serve ``cfg`` at this
    attention TP size, naming the option; None when it can."""
    if cfg.tp_vote != "global" or attn_tp_size <= 1:
        return None
    return (f"--tokenselect-tp-vote global is not implemented on the GPU path yet (attention TP size "
            f"{attn_tp_size}); pass --tokenselect-tp-vote local (each rank votes over its own heads).")


def parse_score_scale(text: str, option: str = "--tokenselect-score-scale") -> Optional[float]:
    """CLI form of ``score_scale``: a positive float, or ``layer``; errors name ``option``."""
    if text.strip().lower() == "layer":
        return None
    try:
        return float(text)
    except ValueError:
        raise ValueError(
            f"{option} must be a positive number or 'layer', got {text!r}"
        ) from None

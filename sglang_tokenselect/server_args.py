"""``--tokenselect-*`` server flags and the argument-resolution hooks.

SGLang builds ``ServerArgs`` from a dataclass; plugins extend it through hooks on
``ServerArgs.add_cli_args`` (extra flags), ``ServerArgs.from_cli_args`` (keep their values)
and the resolution steps of ``ServerArgs.__post_init__`` (defaults and refusals).
The parsed config travels to every SGLang process on the ``ServerArgs`` object as the
private attribute ``_tokenselect_config`` (ServerArgs is read-only once resolved, except
for underscore names).
"""

from __future__ import annotations

import argparse
import contextvars
import logging
from typing import Any, Callable

from sglang_tokenselect.config import VOTES, TokenSelectConfig, parse_score_scale

logger = logging.getLogger(__name__)

BACKEND_NAME = "tokenselect"
CONFIG_ATTR = "_tokenselect_config"
STATS_ATTR = "_tokenselect_stats_interval"
# Selection Cache memory is ~ (H_q*D*2 + topk*4) bytes per layer per pool row: cap the pool
# when the user gave no --max-running-requests (32 MB per 64 rows for Llama-3-8B).
DEFAULT_MAX_RUNNING_REQUESTS = 256

_DEFAULTS = TokenSelectConfig()
# The config being parsed, for the resolution hooks that run inside ServerArgs.__post_init__
# (before from_cli_args can attach it to the object).
_PENDING_CONFIG: contextvars.ContextVar = contextvars.ContextVar("tokenselect_pending_config", default=None)


def _int_at_least(option: str, low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{option} must be an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{option} must be >= {low}, got {value}")
        return value

    return parse


def _threshold(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--tokenselect-cache-threshold must be a number in [-1, 1], got {text!r}"
        ) from None
    if not -1.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(
            "--tokenselect-cache-threshold must be in [-1, 1] (1 selects at every step, "
            f"-1 selects once per request), got {value}"
        )
    return value


def _score_scale(text: str):
    try:
        value = parse_score_scale(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value is not None and not value > 0:
        raise argparse.ArgumentTypeError(
            f"--tokenselect-score-scale must be a positive number or 'layer', got {text!r}"
        )
    return value


def add_tokenselect_args(parser: argparse.ArgumentParser) -> None:
    """Add the ``--tokenselect-*`` flags (defaults: the paper's 128 + 2K + 512, θ = 0.9)."""
    group = parser.add_argument_group("TokenSelect (--attention-backend tokenselect)")
    group.add_argument("--tokenselect-n-init", type=_int_at_least("--tokenselect-n-init", 0),
                       default=_DEFAULTS.n_init, help="Leading tokens always attended.")
    group.add_argument("--tokenselect-n-local", type=_int_at_least("--tokenselect-n-local", 1),
                       default=_DEFAULTS.n_local,
                       help="Most recent tokens always attended, the current one included.")
    group.add_argument("--tokenselect-topk", type=_int_at_least("--tokenselect-topk", 1),
                       default=_DEFAULTS.topk, help="Critical tokens selected per layer and request.")
    group.add_argument("--tokenselect-cache-threshold", type=_threshold,
                       default=_DEFAULTS.cache_threshold,
                       help="Selection Cache: reuse the last selection while cos(q, q_cached) >= this, in [-1, 1]; "
                            "1 = select at every step, -1 = select once per request (static).")
    group.add_argument("--tokenselect-score-scale", type=_score_scale, default=_DEFAULTS.score_scale,
                       help="c in softmax(c * q.k) of the head soft vote: a number (paper: 1.0) or 'layer' "
                            "(the layer's attention scale).")
    group.add_argument("--tokenselect-vote", choices=VOTES, default=_DEFAULTS.vote,
                       help="soft: head soft vote (paper); sum: plain top-k of head-summed scores (ablation).")
    group.add_argument("--tokenselect-sparse-prefill", action="store_true", default=_DEFAULTS.sparse_prefill,
                       help="Chunk-wise sparse prefill: each sub-chunk of --tokenselect-prefill-chunk queries "
                            "attends n_init + top-k (its mean query's vote) + n_local tokens. Off by default "
                            "(no accuracy evidence on a GPU yet).")
    group.add_argument("--tokenselect-prefill-chunk", type=_int_at_least("--tokenselect-prefill-chunk", 1),
                       default=_DEFAULTS.prefill_chunk,
                       help="Sparse prefill sub-chunk size in queries, on absolute positions "
                            "(<= --tokenselect-n-local).")
    group.add_argument("--tokenselect-stats-interval", type=_int_at_least("--tokenselect-stats-interval", 0),
                       default=0, help="Log Selection Cache hit/miss counts every N decode steps (0 = never).")


def config_from_namespace(args: argparse.Namespace) -> TokenSelectConfig:
    """Build (and validate) the config from parsed CLI args."""
    return TokenSelectConfig(
        n_init=args.tokenselect_n_init,
        n_local=args.tokenselect_n_local,
        topk=args.tokenselect_topk,
        cache_threshold=args.tokenselect_cache_threshold,
        score_scale=args.tokenselect_score_scale,
        vote=args.tokenselect_vote,
        sparse_prefill=args.tokenselect_sparse_prefill,
        prefill_chunk=args.tokenselect_prefill_chunk,
    )


def config_from_server_args(server_args: Any) -> TokenSelectConfig:
    """The config a ServerArgs carries; the defaults for one built in Python without it."""
    return getattr(server_args, CONFIG_ATTR, None) or TokenSelectConfig()


def stats_interval_from_server_args(server_args: Any) -> int:
    return int(getattr(server_args, STATS_ATTR, 0) or 0)


def uses_tokenselect(server_args: Any) -> bool:
    return BACKEND_NAME in server_args.get_attention_backends()


# --- hooks (registered by sglang_tokenselect.plugin) -------------------------------------

def after_add_cli_args(result, parser, *args, **kwargs):
    add_tokenselect_args(parser)
    return result


def around_from_cli_args(original, cls, args, *rest, **kwargs):
    config = config_from_namespace(args) if hasattr(args, "tokenselect_topk") else None
    token = _PENDING_CONFIG.set(config)
    try:
        server_args = original(cls, args, *rest, **kwargs)
    finally:
        _PENDING_CONFIG.reset(token)
    if config is not None:
        setattr(server_args, CONFIG_ATTR, config)
        setattr(server_args, STATS_ATTR, args.tokenselect_stats_interval)
    return server_args


def after_attention_backend_compatibility(result, server_args, *args, **kwargs):
    """tokenselect's defaults, set where SGLang resolves other backends' (args still
    writable): a bounded request pool for the Selection Cache, the stats directory and, with
    --enable-metrics, the scheduler metrics collector."""
    if BACKEND_NAME not in server_args._resolved_attention_backends():
        return result
    from sglang_tokenselect.server import wiring

    wiring.configure(server_args)  # stats directory; the metrics collector with --enable-metrics
    if server_args.max_running_requests is None:
        server_args.max_running_requests = DEFAULT_MAX_RUNNING_REQUESTS
        logger.info(
            "TokenSelect: --max-running-requests defaults to %d (the Selection Cache keeps state "
            "per request slot); pass it explicitly to change.", DEFAULT_MAX_RUNNING_REQUESTS,
        )
    config = getattr(server_args, CONFIG_ATTR, None) or _PENDING_CONFIG.get()
    if config is not None and config.sparse_prefill:
        disable_prefill_cuda_graph(server_args)
    return result


def disable_prefill_cuda_graph(server_args: Any) -> None:
    """Sparse prefill plans each extend on the host from its lengths: no prefill CUDA graph.
    Turned off unless the user chose a prefill graph backend explicitly (then refused)."""
    from sglang.srt.model_executor.cuda_graph_config import Backend, Phase

    graphs = getattr(server_args, "cuda_graph_config", None)
    if graphs is None or graphs.prefill.backend == Backend.DISABLED:
        return
    if (Phase.PREFILL, "backend") in getattr(server_args, "_cuda_graph_config_locked", ()):
        raise ValueError(
            "--tokenselect-sparse-prefill does not support a prefill CUDA graph "
            f"(--cuda-graph-backend-prefill {graphs.prefill.backend}); use --cuda-graph-backend-prefill disabled."
        )
    logger.info("TokenSelect: sparse prefill turns the prefill CUDA graph (%s) off.", graphs.prefill.backend)
    graphs.prefill.backend = Backend.DISABLED


def after_post_init(result, server_args, *args, **kwargs):
    """Refuse unsupported combinations once the args are resolved."""
    if uses_tokenselect(server_args):
        check_server_args_supported(server_args)
    return result


def check_server_args_supported(server_args: Any) -> None:
    """Raise ValueError naming the option for what tokenselect cannot serve."""
    prefill, decode = server_args.get_attention_backends()
    if prefill != decode:
        raise ValueError(
            "--attention-backend tokenselect must serve both prefill and decode; got "
            f"--prefill-attention-backend {prefill} and --decode-attention-backend {decode}."
        )
    if server_args.page_size not in (None, 1):
        raise ValueError(f"--attention-backend tokenselect needs --page-size 1, got {server_args.page_size}.")
    if server_args.speculative_algorithm is not None:
        raise ValueError(
            "--attention-backend tokenselect does not support speculative decoding "
            f"(--speculative-algorithm {server_args.speculative_algorithm})."
        )
    if server_args.enable_mixed_chunk:
        raise ValueError(
            "--attention-backend tokenselect does not support --enable-mixed-chunk "
            "(mixed batches send decode tokens through the dense extend path)."
        )
    if server_args.kv_cache_dtype not in ("auto", None) and not str(server_args.kv_cache_dtype).startswith(
        ("bf16", "bfloat16", "fp16", "float16")
    ):
        raise ValueError(
            "--attention-backend tokenselect does not support a quantized KV cache "
            f"(--kv-cache-dtype {server_args.kv_cache_dtype})."
        )
    if getattr(server_args, "enable_dp_attention", False):
        raise ValueError("--attention-backend tokenselect does not support --enable-dp-attention.")
    # In these modes a pool row can change owner without an extend, which is where the
    # Selection Cache forgets a row's selections: a new request would reuse its predecessor's.
    if getattr(server_args, "disaggregation_mode", "null") == "decode":
        raise ValueError(
            "--attention-backend tokenselect does not support --disaggregation-mode decode "
            "(requests start decoding without an extend on this server)."
        )
    for flag in ("enable_two_batch_overlap", "enable_pdmux"):
        if getattr(server_args, flag, False):
            raise ValueError(f"--attention-backend tokenselect does not support --{flag.replace('_', '-')}.")

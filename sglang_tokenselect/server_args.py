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
from typing import Any, Callable, Optional

from sglang_tokenselect.config import TP_VOTES, VOTES, TokenSelectConfig, gpu_tp_vote_refusal, parse_score_scale

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


def int_at_least(option: str, low: int) -> Callable[[str], int]:
    """argparse type: an integer >= ``low``; errors name ``option``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{option} must be an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{option} must be >= {low}, got {value}")
        return value

    return parse


def cache_threshold_type(option: str) -> Callable[[str], float]:
    """argparse type: a Selection Cache threshold in [-1, 1]; errors name ``option``."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{option} must be a number in [-1, 1], got {text!r}") from None
        if not -1.0 <= value <= 1.0:
            raise argparse.ArgumentTypeError(
                f"{option} must be in [-1, 1] (1 selects at every step, -1 selects once per request), "
                f"got {value}"
            )
        return value

    return parse


def score_scale_type(option: str) -> Callable[[str], Optional[float]]:
    """argparse type: a positive number, or ``layer`` (None); errors name ``option``."""
    def parse(text: str) -> Optional[float]:
        try:
            value = parse_score_scale(text, option)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        if value is not None and not value > 0:
            raise argparse.ArgumentTypeError(f"{option} must be a positive number or 'layer', got {text!r}")
        return value

    return parse


def choice_type(option: str, choices: tuple[str, ...] = VOTES) -> Callable[[str], str]:
    """argparse type: one of ``choices``; errors name ``option``."""
    def parse(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"{option} must be one of {', '.join(choices)}, got {text!r}")
        return text

    return parse


# Each flag: (attribute, parser of its text, default). SGLang's parser keeps the text; the
# from_cli_args hook parses it, so a bad value is one line rather than an argparse error after
# SGLang's 400-line usage.
FLAGS = {
    "--tokenselect-n-init": (int_at_least("--tokenselect-n-init", 0), _DEFAULTS.n_init,
                             "Leading tokens always attended."),
    "--tokenselect-n-local": (int_at_least("--tokenselect-n-local", 1), _DEFAULTS.n_local,
                              "Most recent tokens always attended, the current one included."),
    "--tokenselect-topk": (int_at_least("--tokenselect-topk", 1), _DEFAULTS.topk,
                           "Critical tokens selected per layer and request."),
    "--tokenselect-cache-threshold": (
        cache_threshold_type("--tokenselect-cache-threshold"), _DEFAULTS.cache_threshold,
        "Selection Cache: reuse the last selection while cos(q, q_cached) >= this, in [-1, 1]; "
        "1 = select at every step, -1 = select once per request (static)."),
    "--tokenselect-score-scale": (
        score_scale_type("--tokenselect-score-scale"), _DEFAULTS.score_scale,
        "c in softmax(c * q.k) of the head soft vote: a number (paper: 1.0) or 'layer' "
        "(the layer's attention scale)."),
    "--tokenselect-vote": (choice_type("--tokenselect-vote"), _DEFAULTS.vote,
                           "soft: head soft vote (paper); sum: plain top-k of head-summed scores (ablation)."),
    "--tokenselect-tp-vote": (
        choice_type("--tokenselect-tp-vote", TP_VOTES), _DEFAULTS.tp_vote,
        "Under tensor parallelism: global = all-reduce the ranks' votes and cache cosines (every rank "
        "attends the same tokens; CPU path only for now); local = each rank votes over its own heads."),
    "--tokenselect-prefill-chunk": (
        int_at_least("--tokenselect-prefill-chunk", 1), _DEFAULTS.prefill_chunk,
        "Sparse prefill sub-chunk size in queries, on absolute positions (<= --tokenselect-n-local)."),
    "--tokenselect-stats-interval": (int_at_least("--tokenselect-stats-interval", 0), 0,
                                     "Log Selection Cache hit/miss counts every N decode steps (0 = never)."),
}


SPARSE_PREFILL_FLAG = "--tokenselect-sparse-prefill"
EXTRAPOLATE_FLAG = "--tokenselect-extrapolate"
# Switches: flags without a value (off unless given), each with its help text.
SWITCHES = {
    SPARSE_PREFILL_FLAG: (
        "Chunk-wise sparse prefill: each sub-chunk of --tokenselect-prefill-chunk queries attends n_init + "
        "top-k (its mean query's vote) + n_local tokens. Off by default (no accuracy evidence on a GPU yet)."),
    EXTRAPOLATE_FLAG: (
        "Length extrapolation: pre-RoPE keys in the KV pool, RoPE applied by FlashInfer over positions in the "
        "attended list, so prompts may exceed the model's trained context (with --context-length). Needs "
        "--tokenselect-sparse-prefill and a model with plain (or linearly scaled) RoPE. Off by default."),
}
# SGLang refuses a --context-length above the model's unless this is set (ModelConfig).
LONGER_CONTEXT_ENV = "SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN"


def attribute(flag: str) -> str:
    return flag[2:].replace("-", "_")


def add_tokenselect_args(parser: argparse.ArgumentParser) -> None:
    """Add the ``--tokenselect-*`` flags (defaults: the paper's 128 + 2K + 512, θ = 0.9)."""
    group = parser.add_argument_group("TokenSelect (--attention-backend tokenselect)")
    for flag, (_, default, help_text) in FLAGS.items():
        shown = "layer" if default is None else default
        group.add_argument(flag, default=None, help=f"{help_text} Default: {shown}.")
    for flag, help_text in SWITCHES.items():
        group.add_argument(flag, action="store_true", default=False, help=help_text)


def parse_tokenselect_args(args: argparse.Namespace) -> dict[str, Any]:
    """Attribute -> value of every ``--tokenselect-*`` flag (its default where not given).
    Raises argparse.ArgumentTypeError naming the flag of a bad value."""
    values = {}
    for flag, (parse, default, _) in FLAGS.items():
        text = getattr(args, attribute(flag))
        values[attribute(flag)] = default if text is None else parse(text)
    for flag in SWITCHES:
        values[attribute(flag)] = bool(getattr(args, attribute(flag), False))
    return values


def config_from_namespace(args: argparse.Namespace) -> TokenSelectConfig:
    """Build (and validate) the config from parsed CLI args."""
    values = parse_tokenselect_args(args)
    return TokenSelectConfig(
        n_init=values["tokenselect_n_init"],
        n_local=values["tokenselect_n_local"],
        topk=values["tokenselect_topk"],
        cache_threshold=values["tokenselect_cache_threshold"],
        score_scale=values["tokenselect_score_scale"],
        vote=values["tokenselect_vote"],
        sparse_prefill=values["tokenselect_sparse_prefill"],
        prefill_chunk=values["tokenselect_prefill_chunk"],
        extrapolate=values["tokenselect_extrapolate"],
        tp_vote=values["tokenselect_tp_vote"],
    )


def config_from_server_args(server_args: Any) -> TokenSelectConfig:
    """The config a ServerArgs carries; the defaults for one built in Python without it."""
    return getattr(server_args, CONFIG_ATTR, None) or TokenSelectConfig()


def stats_interval_from_server_args(server_args: Any) -> int:
    return int(getattr(server_args, STATS_ATTR, 0) or 0)


def attention_backends(args: Any) -> tuple:
    """(prefill, decode) backends of a parsed command line, a ServerArgs or a resolved view;
    the split fields fall back to ``attention_backend`` (None where SGLang picks one)."""
    backend = getattr(args, "attention_backend", None)
    return (getattr(args, "prefill_attention_backend", None) or backend,
            getattr(args, "decode_attention_backend", None) or backend)


def resolved(server_args: Any) -> Any:
    """``server_args`` as SGLang resolved it: its resolution's declarations over the inputs
    (SGLang 0.5.17 declares some of them, 0.5.23 all)."""
    from sglang.srt.arg_groups.overrides import resolved_view

    return resolved_view(server_args)


def set_resolved(server_args: Any, **fields: Any) -> None:
    """Decide resolved values: a declaration where SGLang resolves through declarations
    (0.5.23), else a plain write while ``__post_init__`` resolves (0.5.17)."""
    try:
        from sglang.srt.arg_groups.overrides import declare_resolution
    except ImportError:
        for name, value in fields.items():
            setattr(server_args, name, value)
        return
    declare_resolution(server_args, "tokenselect", **fields)


def uses_tokenselect(server_args: Any) -> bool:
    return BACKEND_NAME in attention_backends(resolved(server_args))


# --- hooks (registered by sglang_tokenselect.plugin) -------------------------------------

def after_add_cli_args(result, parser, *args, **kwargs):
    add_tokenselect_args(parser)
    return result


def around_from_cli_args(original, cls, args, *rest, **kwargs):
    """Refuse bad ``--tokenselect-*`` values, and what the command line alone shows tokenselect
    cannot serve, as one line and before SGLang resolves the model; keep the parsed config on
    the ServerArgs."""
    has_flags = hasattr(args, "tokenselect_topk")
    try:
        config = config_from_namespace(args) if has_flags else None
    except argparse.ArgumentTypeError as exc:
        raise SystemExit(f"error: {exc}") from None
    if BACKEND_NAME in attention_backends(args):
        reason = unsupported_reason(args, attention_backends(args))
        if reason:
            raise SystemExit(f"error: {reason}")
        if config is not None and config.extrapolate:
            allow_longer_context(getattr(args, "context_length", None))
    token = _PENDING_CONFIG.set(config)
    try:
        server_args = original(cls, args, *rest, **kwargs)
    finally:
        _PENDING_CONFIG.reset(token)
    if config is not None:
        setattr(server_args, CONFIG_ATTR, config)
        setattr(server_args, STATS_ATTR, parse_tokenselect_args(args)["tokenselect_stats_interval"])
    return server_args


def allow_longer_context(context_length: Optional[int]) -> None:
    """Extrapolation serves prompts past the model's trained context when ``--context-length``
    asks for it: SGLang's ModelConfig refuses a context length above the model's unless
    ``SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN`` is set. Set it here (inherited by SGLang's
    scheduler processes, started later) unless the user set it; log what is in effect."""
    import os

    if context_length is None:
        logger.warning(
            "TokenSelect: %s is on but --context-length is not given: SGLang keeps the model's own context "
            "length; pass --context-length N to accept longer prompts.", EXTRAPOLATE_FLAG)
        return
    if LONGER_CONTEXT_ENV not in os.environ:
        os.environ[LONGER_CONTEXT_ENV] = "1"
        logger.info("TokenSelect: %s sets %s=1 so that --context-length %d may exceed the model's trained "
                    "context.", EXTRAPOLATE_FLAG, LONGER_CONTEXT_ENV, context_length)
    elif os.environ[LONGER_CONTEXT_ENV].strip().lower() not in ("1", "true", "yes", "y"):
        logger.warning("TokenSelect: %s=%s (set by you) keeps SGLang from accepting --context-length %d above "
                       "the model's trained context.", LONGER_CONTEXT_ENV, os.environ[LONGER_CONTEXT_ENV],
                       context_length)
    logger.info("TokenSelect: length extrapolation requested, context length %d tokens.", context_length)


def after_attention_backend_compatibility(result, server_args, *args, **kwargs):
    """tokenselect's defaults, set where SGLang resolves other backends': a bounded request
    pool for the Selection Cache, the stats directory and, with --enable-metrics, the
    scheduler metrics collector (sglang_tokenselect.server.wiring)."""
    if not uses_tokenselect(server_args):
        return result
    from sglang_tokenselect.server import wiring

    wiring.configure(server_args)
    if resolved(server_args).max_running_requests is None:
        set_resolved(server_args, max_running_requests=DEFAULT_MAX_RUNNING_REQUESTS)
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
    from sglang.srt.model_executor import cuda_graph_config as cg

    graphs = getattr(resolved(server_args), "cuda_graph_config", None)
    if graphs is None or graphs.prefill.backend == cg.Backend.DISABLED:
        return
    if (cg.Phase.PREFILL, "backend") in getattr(server_args, "_cuda_graph_config_locked", ()):
        raise ValueError(
            "--tokenselect-sparse-prefill does not support a prefill CUDA graph "
            f"(--cuda-graph-backend-prefill {graphs.prefill.backend}); use --cuda-graph-backend-prefill disabled."
        )
    logger.info("TokenSelect: sparse prefill turns the prefill CUDA graph (%s) off.", graphs.prefill.backend)
    if hasattr(cg, "with_phase"):  # SGLang 0.5.23: configs are immutable, resolved by declaration
        set_resolved(server_args, cuda_graph_config=cg.with_phase(graphs, cg.Phase.PREFILL,
                                                                  backend=cg.Backend.DISABLED))
    else:  # 0.5.17: written while __post_init__ resolves
        graphs.prefill.backend = cg.Backend.DISABLED


def after_resolution(result, server_args, *args, **kwargs):
    """Refuse unsupported combinations once the args are resolved."""
    if uses_tokenselect(server_args):
        check_server_args_supported(server_args)
    return result


def check_server_args_supported(server_args: Any) -> None:
    """Raise ValueError naming the option for what tokenselect cannot serve (resolved args)."""
    view = resolved(server_args)
    reason = unsupported_reason(view, attention_backends(view)) or tp_vote_reason(server_args, view)
    if reason:
        raise ValueError(reason)


def tp_vote_reason(server_args: Any, view: Any) -> Optional[str]:
    """``--tokenselect-tp-vote global`` at attention TP > 1 on CUDA (the Triton path cannot
    all-reduce yet), known once the device is resolved; the backend checks again when built."""
    if getattr(view, "device", None) != "cuda":
        return None
    config = getattr(server_args, CONFIG_ATTR, None) or _PENDING_CONFIG.get() or TokenSelectConfig()
    attn_tp = int(getattr(view, "tp_size", 1) or 1) // int(getattr(view, "attn_cp_size", 1) or 1)
    return gpu_tp_vote_refusal(config, attn_tp)


def unsupported_reason(args: Any, backends: tuple) -> Optional[str]:
    """Why tokenselect cannot serve ``args`` (a ServerArgs or the parsed command line), naming
    the option; None when it can. ``backends`` is (prefill, decode)."""
    prefill, decode = backends
    if prefill != decode:
        return ("--attention-backend tokenselect must serve both prefill and decode; got "
                f"--prefill-attention-backend {prefill or 'auto'} and --decode-attention-backend {decode or 'auto'}.")
    if args.page_size not in (None, 1):
        return f"--attention-backend tokenselect needs --page-size 1, got {args.page_size}."
    if args.speculative_algorithm is not None:
        return ("--attention-backend tokenselect does not support speculative decoding "
                f"(--speculative-algorithm {args.speculative_algorithm}).")
    if args.enable_mixed_chunk:
        return ("--attention-backend tokenselect does not support --enable-mixed-chunk "
                "(mixed batches send decode tokens through the dense extend path).")
    if args.kv_cache_dtype not in ("auto", None) and not str(args.kv_cache_dtype).startswith(
        ("bf16", "bfloat16", "fp16", "float16")
    ):
        return ("--attention-backend tokenselect does not support a quantized KV cache "
                f"(--kv-cache-dtype {args.kv_cache_dtype}).")
    if getattr(args, "enable_dp_attention", False):
        return "--attention-backend tokenselect does not support --enable-dp-attention."
    # In these modes a pool row can change owner without an extend, which is where the
    # Selection Cache forgets a row's selections: a new request would reuse its predecessor's.
    if getattr(args, "disaggregation_mode", "null") == "decode":
        return ("--attention-backend tokenselect does not support --disaggregation-mode decode "
                "(requests start decoding without an extend on this server).")
    for flag in ("enable_two_batch_overlap", "enable_pdmux"):
        if getattr(args, flag, False):
            return f"--attention-backend tokenselect does not support --{flag.replace('_', '-')}."
    return None

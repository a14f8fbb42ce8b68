#!/usr/bin/env python
"""Long-context retrieval accuracy through any OpenAI-compatible server.

    python benchmarks/eval_longctx.py --base-url http://127.0.0.1:30000 \\
        --tasks passkey,multikey,kv --lengths 2048,4096,6144,8192 --depths 5 \\
        --label tokenselect --out results.json --heatmap results.png

Builds the prompts of ``sglang_tokenselect_eval.tasks`` (lengths counted in the SmolLM2
tokenizer's tokens with its chat template applied, which is what a server running the
converted SmolLM2 sees), sends each as one user message to ``/v1/chat/completions``
(temperature 0, ``--max-tokens``) from a thread pool, scores the reply by exact match and
writes a JSON (one record per cell: task, length, depth, seed, correct, answer, expected,
token_length, ...) and optionally a PNG heatmap of accuracy over length x depth, one panel per task.

A length that leaves no room for the answer within the server's context (8192 for
SmolLM2, which SGLang reports as ``max_model_len``) is cut to ``context - max_tokens - 1``
prompt tokens; the cell keeps the asked length and records the real ``token_length``.

Only the standard library is used for HTTP. Compare labels by running the script once
against a dense server and once against ``--attention-backend tokenselect``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import urllib.error
import urllib.request
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any, Optional, Sequence

logger = logging.getLogger("eval_longctx")


# --------------------------------------------------------------------------- HTTP


def _request(url: str, payload: Optional[dict], *, timeout: float, api_key: Optional[str]) -> dict:
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, method="GET" if payload is None else "POST")
    req.add_header("Content-Type", "application/json")
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read().decode())


def _v1(base_url: str, path: str) -> str:
    base = base_url.rstrip("/")
    if not base.endswith("/v1"):
        base += "/v1"
    return base + path


def discover_model(base_url: str, *, timeout: float = 30.0, api_key: Optional[str] = None) -> tuple[str, Optional[int]]:
    """The first model listed by ``/v1/models``: its id and ``max_model_len`` (None if absent)."""
    out = _request(_v1(base_url, "/models"), None, timeout=timeout, api_key=api_key)
    models = out.get("data") or []
    if not models:
        raise RuntimeError(f"{base_url}: /v1/models lists no model")
    return models[0]["id"], models[0].get("max_model_len")


def chat_completion(
    base_url: str,
    model: str,
    messages: list[dict[str, str]],
    *,
    max_tokens: int,
    timeout: float,
    api_key: Optional[str] = None,
    retries: int = 2,
) -> str:
    """Greedy chat completion; retries connection errors and 5xx answers."""
    payload = {"model": model, "messages": messages, "temperature": 0.0, "max_tokens": max_tokens}
    for attempt in range(retries + 1):
        try:
            out = _request(_v1(base_url, "/chat/completions"), payload, timeout=timeout, api_key=api_key)
            return out["choices"][0]["message"]["content"] or ""
        except urllib.error.HTTPError as e:
            if e.code < 500 or attempt == retries:
                raise
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if attempt == retries:
                raise
        time.sleep(1.0 + attempt)
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- evaluation


def parse_depths(text: str) -> list[float]:
    """``5`` -> 5 evenly spaced depths in [0, 1]; ``0.1,0.5`` -> those depths."""
    from sglang_tokenselect_eval.tasks import depth_grid

    text = str(text).strip()
    if "," in text or "." in text:
        depths = [float(x) for x in text.split(",") if x.strip()]
        if not all(0.0 <= d <= 1.0 for d in depths):
            raise ValueError(f"depths must be in [0, 1]: {text}")
        return depths
    return depth_grid(int(text))


def build_samples(tokenizer, tasks: Sequence[str], lengths: Sequence[int], depths: Sequence[float],
                  samples: int = 1, seed: int = 0, max_prompt: Optional[int] = None) -> list:
    """One sample per (task, length, depth, seed). Lengths above ``max_prompt`` are cut to
    it (the server rejects prompt + completion beyond its context); the asked length stays
    in ``sample.extra["asked_length"]`` and labels the cell."""
    from sglang_tokenselect_eval.tasks import make_sample

    out = []
    for length in lengths:
        target = length if max_prompt is None else min(length, max_prompt)
        if target != length:
            logger.warning("length %d: prompts cut to %d tokens to leave room for the answer "
                           "within the server's context", length, target)
        for task in tasks:
            for depth in depths:
                for k in range(samples):
                    sample = make_sample(task, tokenizer, target, depth, seed + k)
                    sample.extra["asked_length"] = length
                    out.append(sample)
    return out


def evaluate(
    samples: list,
    base_url: str,
    model: str,
    *,
    concurrency: int = 8,
    max_tokens: int = 48,
    timeout: float = 600.0,
    api_key: Optional[str] = None,
    progress: bool = True,
    retries: int = 2,
) -> list[dict[str, Any]]:
    """Send every sample; one result dict per sample, in the order of ``samples``."""
    from tqdm import tqdm

    def one(sample) -> dict[str, Any]:
        t0 = time.perf_counter()
        answer, error = None, None
        try:
            answer = chat_completion(base_url, model, sample.messages, max_tokens=max_tokens,
                                     timeout=timeout, api_key=api_key, retries=retries)
        except Exception as e:  # noqa: BLE001 - recorded per cell, the run goes on
            error = f"{type(e).__name__}: {e}"
            logger.warning("%s length=%d depth=%.2f failed: %s", sample.task, sample.target_length, sample.depth, error)
        return {
            "task": sample.task,
            "length": sample.extra.get("asked_length", sample.target_length),
            "depth": sample.depth,
            "seed": sample.seed,
            "correct": bool(answer is not None and sample.score(answer)),
            "answer": answer,
            "expected": sample.expected,
            "token_length": sample.token_length,
            "needle_token_pos": sample.needle_token_pos,
            "needle_depth": round(sample.needle_depth, 4),
            "latency_s": round(time.perf_counter() - t0, 3),
            "error": error,
        }

    results: list[Optional[dict]] = [None] * len(samples)
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        futures = {pool.submit(one, s): i for i, s in enumerate(samples)}
        bar = tqdm(total=len(samples), desc="eval", unit="prompt", disable=not progress, file=sys.stderr)
        correct = done = 0
        for fut in as_completed(futures):
            r = fut.result()
            results[futures[fut]] = r
            correct += r["correct"]
            done += 1
            bar.update(1)
            bar.set_postfix(acc=f"{correct / done:.2f}")
        bar.close()
    return results  # type: ignore[return-value]


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    by_task: dict[str, list[bool]] = defaultdict(list)
    by_len: dict[str, dict[int, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        by_task[r["task"]].append(r["correct"])
        by_len[r["task"]][r["length"]].append(r["correct"])
    return {
        "accuracy": sum(r["correct"] for r in results) / len(results) if results else 0.0,
        "cells": len(results),
        "errors": sum(r["error"] is not None for r in results),
        "per_task": {t: sum(v) / len(v) for t, v in by_task.items()},
        "per_task_length": {t: {str(L): sum(v) / len(v) for L, v in sorted(d.items())} for t, d in by_len.items()},
    }


def plot_heatmap(results: list[dict[str, Any]], path: str, title: str = "") -> None:
    """Accuracy over length (rows) x depth (columns), one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks = list(dict.fromkeys(r["task"] for r in results))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.4 * len(tasks) + 1.5, 3.8), squeeze=False)
    for col, (ax, task) in enumerate(zip(axes[0], tasks)):
        rows = [r for r in results if r["task"] == task]
        lengths = sorted({r["length"] for r in rows})
        depths = sorted({r["depth"] for r in rows})
        acc = np.full((len(lengths), len(depths)), np.nan)
        for i, L in enumerate(lengths):
            for j, d in enumerate(depths):
                cell = [r["correct"] for r in rows if r["length"] == L and r["depth"] == d]
                if cell:
                    acc[i, j] = sum(cell) / len(cell)
        im = ax.imshow(acc, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
        ax.set_xticks(range(len(depths)), [f"{d:.2f}" for d in depths], rotation=45)
        ax.set_yticks(range(len(lengths)), [str(L) for L in lengths])
        ax.set_xlabel("needle depth")
        if col == 0:
            ax.set_ylabel("prompt tokens")
        mean = np.nanmean(acc) if acc.size else float("nan")
        ax.set_title(f"{task} (acc {mean:.2f})")
        for i in range(len(lengths)):
            for j in range(len(depths)):
                if not np.isnan(acc[i, j]):
                    ax.text(j, i, f"{acc[i, j]:.1f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", required=True, help="server root, e.g. http://127.0.0.1:30000")
    p.add_argument("--tasks", default="passkey,multikey,kv")
    p.add_argument("--lengths", default="2048,4096,6144,8192")
    p.add_argument("--depths", default="5", help="a count of evenly spaced depths, or a comma list")
    p.add_argument("--samples", type=int, default=1, help="prompts (seeds) per cell")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", default=None, help="name of this run (e.g. dense, tokenselect-k2048)")
    p.add_argument("--out", required=True, help="result JSON")
    p.add_argument("--heatmap", default=None, help="PNG heatmap")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the converted SmolLM2)")
    p.add_argument("--model", default=None, help="model name to send (default: first of /v1/models)")
    p.add_argument("--max-context", type=int, default=None,
                   help="server context length; prompts are cut to it minus --max-tokens "
                        "(default: max_model_len from /v1/models; 0: no cut)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from transformers import AutoTokenizer

    from sglang_tokenselect_eval.tasks import TASKS

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise SystemExit(f"unknown task(s) {unknown}; choose from {TASKS}")
    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    depths = parse_depths(args.depths)
    if args.tokenizer:
        tok_dir = args.tokenizer
    else:
        from sglang_tokenselect_eval.smollm2 import ensure_converted

        tok_dir = str(ensure_converted())
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    model, served_len = discover_model(args.base_url, api_key=args.api_key)
    model = args.model or model
    max_context = served_len if args.max_context is None else (args.max_context or None)
    max_prompt = max_context - args.max_tokens - 1 if max_context else None
    samples = build_samples(tokenizer, tasks, lengths, depths, args.samples, args.seed, max_prompt)
    logger.info("%d prompts for %s (model %s)", len(samples), args.base_url, model)
    t0 = time.perf_counter()
    results = evaluate(samples, args.base_url, model, concurrency=args.concurrency,
                       max_tokens=args.max_tokens, timeout=args.timeout, api_key=args.api_key,
                       progress=not args.no_progress)
    summary = summarize(results)
    doc = {
        "label": args.label,
        "base_url": args.base_url,
        "model": model,
        "max_context": max_context,
        "tokenizer": tok_dir,
        "tasks": tasks,
        "lengths": lengths,
        "depths": depths,
        "samples": args.samples,
        "seed": args.seed,
        "max_tokens": args.max_tokens,
        "wall_s": round(time.perf_counter() - t0, 2),
        "summary": summary,
        "results": results,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(doc, fh, indent=2)
    if args.heatmap:
        plot_heatmap(results, args.heatmap, title=args.label or "")
    print(json.dumps({"label": args.label, **{k: summary[k] for k in ("accuracy", "cells", "errors", "per_task")}}))
    return 0 if summary["errors"] < len(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())

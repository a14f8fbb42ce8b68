"""Results of the end-to-end benchmark (``e2e_bench.py``): comparison and report.

Cross-backend comparison (identical greedy ids, decode ms/token side by side, ratio to
flashinfer, throughput table, Selection Cache hit rates), ``summarize`` /
``validate_results`` of the results JSON, the printed tables, the plot hook
(``plot_e2e.py``), JSON writing and merging an earlier ``e2e.json``
(``--compare-with``), and the environment (``device_info``, ``package_versions``).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

from e2e_util import _round, log

PLOT_NAME = "e2e_decode.png"


# --------------------------------------------------------------------------
# cross-backend comparison and summary
# --------------------------------------------------------------------------


def compare_ids(ref: Optional[Sequence[int]], other: Optional[Sequence[int]]) -> Dict[str, Any]:
    if ref is None or other is None:
        return {"identical": False, "comparable": False}
    n = min(len(ref), len(other))
    first_div = None
    same = 0
    for i in range(n):
        if ref[i] == other[i]:
            same += 1
        elif first_div is None:
            first_div = i
    if first_div is None and len(ref) != len(other):
        first_div = n
    identical = list(ref) == list(other)
    return {
        "identical": identical,
        "comparable": True,
        "first_divergence": first_div,
        "match_fraction": _round(same / max(len(ref), len(other)), 4) if max(len(ref), len(other)) else 1.0,
        "len_ref": len(ref),
        "len_other": len(other),
    }


def compare_correctness(backends: Dict[str, Dict[str, Any]], order: Sequence[str]) -> Optional[Dict[str, Any]]:
    ran = [b for b in order
           if isinstance(backends.get(b, {}).get("phases", {}).get("correctness"), dict)
           and backends[b]["phases"]["correctness"].get("prompts")]
    if len(ran) < 2:
        return None
    ref = ran[0]
    out: Dict[str, Any] = {"reference": ref, "backends": {}}
    ref_prompts = {p["name"]: p for p in backends[ref]["phases"]["correctness"]["prompts"]}
    all_ok = True
    for b in ran[1:]:
        rows = []
        for p in backends[b]["phases"]["correctness"]["prompts"]:
            rp = ref_prompts.get(p["name"])
            c = compare_ids(rp.get("output_ids") if rp else None, p.get("output_ids"))
            c["name"] = p["name"]
            c["prompt_len"] = p.get("prompt_len")
            lr = (rp or {}).get("output_logprobs")
            lo = p.get("output_logprobs")
            if lr and lo:
                m = min(len(lr), len(lo), (c.get("first_divergence") if c.get("first_divergence") is not None else 10**9))
                if m > 0:
                    c["max_abs_logprob_diff"] = _round(max(abs(x - y) for x, y in zip(lr[:m], lo[:m])), 6)
            rows.append(c)
            all_ok = all_ok and c["identical"]
        out["backends"][b] = {"prompts": rows, "all_identical": all(r["identical"] for r in rows) and bool(rows)}
    out["all_identical"] = all_ok and all(v["all_identical"] for v in out["backends"].values())
    return out


def _long_entries(backends: Dict[str, Any], b: str) -> Dict[int, Dict[str, Any]]:
    lc = backends.get(b, {}).get("phases", {}).get("long_context")
    if not isinstance(lc, dict):
        return {}
    return {int(c["context"]): c for c in lc.get("contexts", []) if "skipped" not in c}


def decode_table(backends: Dict[str, Dict[str, Any]], order: Sequence[str],
                 contexts: Sequence[int]) -> List[Dict[str, Any]]:
    """Side-by-side decode ms/token (and TTFT) per context; ratio = other / reference."""
    ref = order[0] if order else None
    per = {b: _long_entries(backends, b) for b in order}
    rows = []
    for L in contexts:
        row: Dict[str, Any] = {"context": int(L)}
        for b in order:
            e = per[b].get(int(L), {})
            row[f"{b}_ms_per_token"] = e.get("decode_ms_per_token") if e.get("ok") else None
            row[f"{b}_tokens_per_s"] = e.get("decode_tokens_per_s") if e.get("ok") else None
            row[f"{b}_ttft_s"] = e.get("ttft_s") if e.get("ok") else None
        for b in order[1:]:
            r, o = row.get(f"{ref}_ms_per_token"), row.get(f"{b}_ms_per_token")
            row[f"ratio_{b}_over_{ref}"] = _round(o / r, 4) if r and o else None
            row[f"speedup_{b}_vs_{ref}"] = _round(r / o, 4) if r and o else None
            ids_r = per[ref].get(int(L), {}).get("output_ids")
            ids_o = per[b].get(int(L), {}).get("output_ids")
            if ids_r and ids_o:
                c = compare_ids(ids_r, ids_o)
                row[f"output_match_{b}"] = {k: c[k] for k in ("identical", "first_divergence", "match_fraction")}
        rows.append(row)
    return rows


def decode_series(backends: Dict[str, Dict[str, Any]], order: Sequence[str]) -> Dict[str, List[Tuple[int, float]]]:
    """``{label: [(context, decode ms/token), ...]}`` from the successful long-context requests."""
    out: Dict[str, List[Tuple[int, float]]] = {}
    for b in order:
        pts = [(L, float(e["decode_ms_per_token"])) for L, e in sorted(_long_entries(backends, b).items())
               if e.get("ok") and isinstance(e.get("decode_ms_per_token"), (int, float))]
        if pts:
            out[b] = pts
    return out


def flashinfer_reference(labels: Sequence[str]) -> Optional[str]:
    """``flashinfer`` if among ``labels``, else the first ``flashinfer@...`` label, else None."""
    if "flashinfer" in labels:
        return "flashinfer"
    return next((b for b in labels if b.split("@")[0] == "flashinfer"), None)


def ratio_to_flashinfer(backends: Dict[str, Dict[str, Any]], order: Sequence[str]) -> Optional[Dict[str, Any]]:
    """Decode ms/token of every other label divided by flashinfer's, per context (>1: slower).

    None unless a flashinfer label has long-context results.  Contexts are the union
    over all labels (merged files may differ); a missing value is None.
    """
    series = decode_series(backends, order)
    ref = flashinfer_reference(list(series))
    if ref is None:
        return None
    ref_ms = dict(series[ref])
    others = [b for b in series if b != ref]
    contexts = sorted({L for pts in series.values() for L, _ in pts})
    rows = []
    for L in contexts:
        row: Dict[str, Any] = {"context": L, "reference_ms_per_token": ref_ms.get(L), "ratios": {}}
        for b in others:
            o = dict(series[b]).get(L)
            row["ratios"][b] = _round(o / ref_ms[L], 4) if o and ref_ms.get(L) else None
        rows.append(row)
    return {"reference": ref, "metric": "decode ms/token of label / reference (>1: slower)",
            "labels": others, "rows": rows}


def throughput_table(backends: Dict[str, Dict[str, Any]], order: Sequence[str]) -> List[Dict[str, Any]]:
    """Per throughput configuration: each label's steady aggregate decode tokens/s,
    ms per step, prefill time, and tokens/s relative to flashinfer (>1: faster)."""
    per: Dict[str, Dict[str, Dict[str, Any]]] = {}
    configs: List[str] = []
    for b in order:
        tp = backends.get(b, {}).get("phases", {}).get("throughput")
        if not isinstance(tp, dict):
            continue
        for c in tp.get("configs", []):
            if "skipped" in c or "config" not in c:
                continue
            per.setdefault(c["config"], {})[b] = c
            if c["config"] not in configs:
                configs.append(c["config"])
    rows = []
    for name in configs:
        ran = per[name]
        row: Dict[str, Any] = {"config": name, "backends": {}}
        for b, c in ran.items():
            row["backends"][b] = {k: c.get(k) for k in (
                "ok", "steady_decode_tokens_per_s", "steady_ms_per_step", "prefill_s", "wall_s",
                "kv_pool_fits", "n_ok", "n_requests")}
            spr = c.get("steady_per_request_decode_ms") or {}
            row["backends"][b]["steady_per_request_decode_ms_median"] = spr.get("median")
        ref = flashinfer_reference([b for b in order if b in ran])
        if ref is not None:
            row["reference"] = ref
            r = ran[ref].get("steady_decode_tokens_per_s")
            row["tokens_per_s_ratio_to_reference"] = {
                b: (_round(c.get("steady_decode_tokens_per_s") / r, 4)
                    if r and c.get("steady_decode_tokens_per_s") else None)
                for b, c in ran.items() if b != ref}
        rows.append(row)
    return rows


def hit_rates(backends: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    out = {}
    for b, r in backends.items():
        sc = (r.get("phases", {}).get("log") or {}).get("selection_cache")
        if sc:
            out[b] = {k: sc.get(k) for k in ("hit_rate", "hits", "misses", "decode_steps",
                                             "selections", "dense", "n_lines", "counters")}
    return out


def summarize(results: Dict[str, Any]) -> Dict[str, Any]:
    """Fill ``results['comparison']`` and ``results['summary']``."""
    cfg = results.get("config", {})
    order = [b for b in (cfg.get("compare_order") or cfg.get("backends", []))
             if b in results.get("backends", {})]
    backends = results.get("backends", {})
    comp: Dict[str, Any] = {
        "reference_backend": order[0] if order else None,
        "decode_ms_per_token": decode_table(backends, order, cfg.get("contexts", [])),
        "identical_outputs": compare_correctness(backends, order),
        "selection_cache_hit_rate": hit_rates(backends),
    }
    sp = {}
    for b in order:
        p = backends[b].get("phases", {}).get("shared_prefix")
        if isinstance(p, dict):
            sp[b] = p.get("cached_tokens_b")
    comp["shared_prefix_cached_tokens"] = sp
    comp["ratio_to_flashinfer"] = ratio_to_flashinfer(backends, order)
    comp["throughput"] = throughput_table(backends, order)
    results["comparison"] = comp

    problems: List[str] = []
    for b in (cfg.get("compare_order") or cfg.get("backends", [])):
        r = backends.get(b)
        if r is None:
            problems.append(f"{b}: not run")
            continue
        if not r.get("server", {}).get("ready"):
            problems.append(f"{b}: server not ready ({r.get('server', {}).get('error')})")
            continue
        for name, p in r.get("phases", {}).items():
            if isinstance(p, dict) and p.get("skipped"):
                problems.append(f"{b}: {name} skipped ({p['skipped']})")
            elif isinstance(p, dict) and p.get("ok") is False:
                problems.append(f"{b}: {name} failed")
        lc = r.get("phases", {}).get("long_context") or {}
        for c in lc.get("contexts", []) if isinstance(lc, dict) else []:
            if c.get("skipped"):
                problems.append(f"{b}: long_context {c.get('context')} skipped ({c['skipped']})")
        tp = r.get("phases", {}).get("throughput") or {}
        for c in tp.get("configs", []) if isinstance(tp, dict) else []:
            if c.get("skipped"):
                problems.append(f"{b}: throughput {c.get('config')} skipped ({c['skipped']})")
            for w in c.get("warnings") or []:
                problems.append(f"{b}: throughput {c.get('config')}: {w}")
        lg = r.get("phases", {}).get("log") or {}
        if lg.get("traceback_count"):
            problems.append(f"{b}: {lg['traceback_count']} Traceback(s) in server log")
        if b.partition("@")[0] == "tokenselect" and "log" in r.get("phases", {}) and not lg.get("selection_cache"):
            problems.append(f"{b}: no 'TokenSelect stats' line with hits=/misses= in server log")
        for e in r.get("errors", []):
            problems.append(f"{b}: {e}")
    ident = comp["identical_outputs"]
    if ident is not None and not ident.get("all_identical"):
        problems.append("correctness: outputs differ from the reference backend")
    results["summary"] = {"ok": not problems, "problems": problems,
                          "ratio_to_flashinfer": comp["ratio_to_flashinfer"]}
    return results


def validate_results(results: Dict[str, Any]) -> List[str]:
    """Structural check of the results JSON; returns a list of problems (empty = valid)."""
    errs: List[str] = []
    top = {"schema_version": int, "date": str, "command": str, "device": dict, "versions": dict,
           "config": dict, "backends": dict, "comparison": dict, "summary": dict, "status": str}
    for k, t in top.items():
        if k not in results:
            errs.append(f"missing top-level key {k}")
        elif not isinstance(results[k], t):
            errs.append(f"{k} should be {t.__name__}")
    if errs:
        return errs
    for b, r in results["backends"].items():
        for k in ("server", "phases", "errors"):
            if k not in r:
                errs.append(f"backends.{b} missing {k}")
        if "server" in r and "cmd" not in r["server"]:
            errs.append(f"backends.{b}.server missing cmd")
    comp = results["comparison"]
    for k in ("decode_ms_per_token", "identical_outputs", "selection_cache_hit_rate"):
        if k not in comp:
            errs.append(f"comparison missing {k}")
    if not isinstance(comp.get("decode_ms_per_token"), list):
        errs.append("comparison.decode_ms_per_token should be a list")
    for k in ("ok", "problems"):
        if k not in results["summary"]:
            errs.append(f"summary missing {k}")
    try:
        json.dumps(results)
    except (TypeError, ValueError) as e:
        errs.append(f"not JSON-serializable: {e}")
    return errs


def _fmt(x: Any, w: int, nd: int = 2) -> str:
    return f"{x:>{w}.{nd}f}" if isinstance(x, (int, float)) else f"{'-':>{w}}"


def format_ratio_lines(ratio: Optional[Dict[str, Any]]) -> List[str]:
    """The ratio-to-flashinfer table (decode ms/token, label / flashinfer) as text lines."""
    if not ratio or not ratio.get("labels"):
        return []
    ref, labels = ratio["reference"], ratio["labels"]
    w = max([18] + [len(b) + 2 for b in labels])
    lines = [f"ratio to {ref} (decode ms/token, label / {ref}; >1 = slower):",
             f"{'context':>8} {ref + ' ms':>{w}} " + " ".join(f"{b:>{w}}" for b in labels)]
    for row in ratio["rows"]:
        lines.append(f"{row['context']:>8} {_fmt(row.get('reference_ms_per_token'), w)} "
                     + " ".join(_fmt(row["ratios"].get(b), w, 3) for b in labels))
    return lines


def format_throughput_lines(rows: Sequence[Dict[str, Any]]) -> List[str]:
    """Throughput table: steady aggregate decode tokens/s (ms/step, prefill s) per label."""
    lines: List[str] = []
    for row in rows:
        if not lines:
            lines.append("throughput (all requests decoding): aggregate decode tok/s | ms/step | prefill s"
                         " | tok/s vs flashinfer")
        for b, c in row["backends"].items():
            rr = (row.get("tokens_per_s_ratio_to_reference") or {}).get(b)
            fit = "" if c.get("kv_pool_fits") is not False else "  [KV pool too small]"
            lines.append(f"{row['config']:>10} {b:>22}: {_fmt(c.get('steady_decode_tokens_per_s'), 10, 1)} |"
                         f"{_fmt(c.get('steady_ms_per_step'), 8, 2)} |{_fmt(c.get('prefill_s'), 7, 1)} |"
                         f"{_fmt(rr, 6, 3)}  ok={c.get('ok')} {c.get('n_ok')}/{c.get('n_requests')}{fit}")
    return lines


def format_table(results: Dict[str, Any]) -> str:
    cfg = results.get("config", {})
    order = [b for b in (cfg.get("compare_order") or cfg.get("backends", []))
             if b in results.get("backends", {})]
    comp = results.get("comparison", {})
    lines = []
    dev = results.get("device", {}).get("name")
    lines.append(f"=== e2e summary: {dev} | status={results.get('status')} | "
                 f"elapsed {results.get('elapsed_s')} s ===")
    ref = order[0] if order else "-"
    head = f"{'context':>8} " + " ".join(f"{b + ' ms/tok':>18}" for b in order)
    head += " " + " ".join(f"{b + '/' + ref:>22}" for b in order[1:])
    head += " " + " ".join(f"{b + ' TTFT s':>16}" for b in order)
    lines.append("decode ms/token (bs=1, median inter-token latency):")
    lines.append(head)

    def f(x: Any, w: int, nd: int = 2) -> str:
        return f"{x:>{w}.{nd}f}" if isinstance(x, (int, float)) else f"{'-':>{w}}"

    rows = comp.get("decode_ms_per_token", [])
    if not any(row.get(f"{b}_ms_per_token") is not None for row in rows for b in order):
        lines[-2:] = ["decode ms/token (bs=1): no long_context results"]
        rows = []
    for row in rows:
        s = f"{row['context']:>8} " + " ".join(f(row.get(f'{b}_ms_per_token'), 18) for b in order)
        s += " " + " ".join(f(row.get(f"ratio_{b}_over_{ref}"), 22, 3) for b in order[1:])
        s += " " + " ".join(f(row.get(f"{b}_ttft_s"), 16, 2) for b in order)
        lines.append(s)
    lines += format_ratio_lines(comp.get("ratio_to_flashinfer"))
    lines += format_throughput_lines(comp.get("throughput") or [])
    ident = comp.get("identical_outputs")
    if ident:
        for b, v in ident.get("backends", {}).items():
            parts = []
            for p in v["prompts"]:
                tag = "identical" if p["identical"] else f"DIFF@{p.get('first_divergence')}"
                parts.append(f"{p['name']}={tag}")
            lines.append(f"correctness {b} vs {ident['reference']}: " + ", ".join(parts))
    else:
        lines.append("correctness: not compared (needs two backends with results)")
    for b in order:
        ph = results["backends"][b].get("phases", {})
        chat = ph.get("chat") or {}
        bat = ph.get("batching") or {}
        sp = ph.get("shared_prefix") or {}
        lg = ph.get("log") or {}
        srv = results["backends"][b].get("server", {})
        lines.append(
            f"{b}: ready={srv.get('ready')} start={srv.get('ready_s', '-')}s | chat={'ok' if chat.get('ok') else chat.get('error', '-') if chat else '-'}"
            f" | batch {bat.get('n_ok', '-')}/{bat.get('n_requests', '-')} ok, "
            f"{bat.get('decode_tokens_per_s', '-')} decode tok/s"
            f" | prefix cached_tokens={sp.get('cached_tokens_b', '-')}"
            f" | log tracebacks={lg.get('traceback_count', '-')} error_lines={lg.get('error_line_count', '-')}"
        )
    for b, hr in comp.get("selection_cache_hit_rate", {}).items():
        lines.append(f"{b} Selection Cache hit rate: {hr.get('hit_rate')} "
                     f"(hits={hr.get('hits')} misses={hr.get('misses')} lines={hr.get('n_lines')})")
    summ = results.get("summary", {})
    lines.append(f"OK={summ.get('ok')}" + ("" if summ.get("ok") else " problems: " + "; ".join(summ.get("problems", [])[:8])))
    return "\n".join(lines)


# --------------------------------------------------------------------------
# plot, JSON files
# --------------------------------------------------------------------------


def write_plot(results: Dict[str, Any], out_dir: str) -> Dict[str, Any]:
    """Write ``PLOT_NAME`` (decode ms/token vs context, ``plot_e2e.py``) into ``out_dir``."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    try:
        import plot_e2e  # noqa: E402  (sibling file)

        res = plot_e2e.plot_decode(results, os.path.join(out_dir, PLOT_NAME))
    except Exception as e:
        res = {"skipped": f"plot failed: {type(e).__name__}: {e}"[:300]}
    if res.get("path"):
        log(f"plot: {res['path']} ({len(res.get('labels', []))} label(s))")
    else:
        log(f"plot: skipped ({res.get('skipped')})")
    return res


def _atomic_write_json(path: str, obj: Dict[str, Any]) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, default=str)
        f.write("\n")
    os.replace(tmp, path)


def load_previous(path: str, run_now: Sequence[str]) -> Tuple[Dict[str, Any], List[str]]:
    """Backends of an earlier e2e.json (those not run now) for the comparison.

    Labels that file itself merged (its ``compare_order``) come along, keeping the
    ``from_file`` of their first origin, so merges chain (bs1-a -> bs1-b -> ...).
    """
    with open(path, encoding="utf-8") as f:
        prev = json.load(f)
    got: Dict[str, Any] = {}
    order: List[str] = []
    pcfg = prev.get("config", {})
    for b in pcfg.get("compare_order") or pcfg.get("backends") or list(prev.get("backends", {})):
        if b in run_now or b not in prev.get("backends", {}) or b in got:
            continue
        rec = dict(prev["backends"][b])
        rec.setdefault("from_file", {"path": os.path.abspath(path), "date": prev.get("date"),
                                     "device": (prev.get("device") or {}).get("name")})
        got[b] = rec
        order.append(b)
    return got, order


# --------------------------------------------------------------------------
# environment info
# --------------------------------------------------------------------------


def package_versions() -> Dict[str, Optional[str]]:
    try:
        from importlib import metadata
    except ImportError:  # pragma: no cover
        return {}
    names = {
        "torch": ["torch"],
        "sglang": ["sglang"],
        "sgl_kernel": ["sgl-kernel", "sgl_kernel"],
        "flashinfer": ["flashinfer-python", "flashinfer"],
        "flashinfer_cubin": ["flashinfer-cubin"],
        "flashinfer_jit_cache": ["flashinfer-jit-cache"],
        "triton": ["triton"],
        "transformers": ["transformers"],
        "tokenizers": ["tokenizers"],
        "sglang_tokenselect": ["sglang-tokenselect", "sglang_tokenselect"],
        "requests": ["requests"],
    }
    out: Dict[str, Optional[str]] = {}
    for key, cands in names.items():
        out[key] = None
        for c in cands:
            try:
                out[key] = metadata.version(c)
                break
            except Exception:
                continue
    out["python"] = platform.python_version()
    return out


def device_info(timeout: float = 15.0) -> Dict[str, Any]:
    info: Dict[str, Any] = {"name": None}
    try:
        p = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=timeout,
        )
        if p.returncode == 0 and p.stdout.strip():
            gpus = [l.strip() for l in p.stdout.strip().splitlines() if l.strip()]
            parts = [x.strip() for x in gpus[0].split(",")]
            info.update(name=parts[0], source="nvidia-smi", count=len(gpus))
            if len(parts) > 1:
                info["driver"] = parts[1]
            if len(parts) > 2:
                info["memory_total"] = parts[2]
            return info
    except Exception:
        pass
    if not any(os.path.exists(f"/dev/nvidia{i}") for i in range(8)):
        info["note"] = "no nvidia-smi and no /dev/nvidia*"
        return info
    # Fallback: torch in a subprocess, so no CUDA context lingers in this process.
    code = ("import json,torch;print(json.dumps({'name': torch.cuda.get_device_name(0) "
            "if torch.cuda.is_available() else None, 'cuda': torch.version.cuda}))")
    try:
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        if p.returncode == 0:
            d = json.loads(p.stdout.strip().splitlines()[-1])
            info.update(name=d.get("name"), cuda=d.get("cuda"), source="torch")
    except Exception:
        pass
    return info

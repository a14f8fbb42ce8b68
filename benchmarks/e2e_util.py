"""Shared helpers of the end-to-end benchmark (``e2e_bench.py``).

Logging (with a copy into ``e2e_stdout.log``), list parsing, rounding, reproducible
random prompt ids, the wall-clock ``Budget`` and the time plan that shares it among
the backends (how long a server start may take, how long its phases get).
"""

from __future__ import annotations

import datetime as _dt
import random
import time
from typing import Any, List, Optional

# Time planning: every later backend keeps at least this much (a warm server start is
# ~70 s, plus a few phases) when an earlier server start runs long.
LATER_BACKEND_MIN_S = 150.0
FINAL_RESERVE_S = 15.0  # final shutdown + report
LATER_START_EST_S = 90.0  # a warm server start (~70 s) plus its stop, for later backends

# Random prompt ids are drawn from [PROMPT_ID_LO, PROMPT_ID_HI): regular (non
# special) ids of the dummy tokenizer, whose vocab is the model's 128256.
PROMPT_ID_LO = 1000
PROMPT_ID_HI = 128000


_STDOUT_COPY: List[Any] = []


def log(msg: str) -> None:
    line = f"[e2e {time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    for f in _STDOUT_COPY:
        try:
            f.write(line + "\n")
            f.flush()
        except Exception:
            pass


def parse_int_list(text: str) -> List[int]:
    out = []
    for part in str(text).replace(" ", "").split(","):
        if part:
            out.append(int(float(part)))
    return out


def parse_str_list(text: str) -> List[str]:
    return [p.strip() for p in str(text).split(",") if p.strip()]


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds")


def _round(x: Optional[float], nd: int = 3) -> Optional[float]:
    if x is None:
        return None
    try:
        return round(float(x), nd)
    except (TypeError, ValueError):
        return None


def make_prompt_ids(length: int, seed: int, lo: int = PROMPT_ID_LO, hi: int = PROMPT_ID_HI) -> List[int]:
    """``length`` pseudo-random token ids in ``[lo, hi)``, reproducible from ``seed``."""
    rng = random.Random(int(seed) * 1_000_003 + int(length))
    return [rng.randrange(lo, hi) for _ in range(int(length))]


class Budget:
    """A wall-clock deadline (monotonic seconds)."""

    def __init__(self, seconds: float, start: Optional[float] = None):
        self.start = time.monotonic() if start is None else start
        self.deadline = self.start + float(seconds)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def sub(self, seconds: float) -> "Budget":
        """A child budget ending at ``min(now + seconds, self.deadline)``."""
        b = Budget(0.0)
        b.deadline = min(time.monotonic() + max(0.0, seconds), self.deadline)
        return b

    def timeout(self, wanted: float, floor: float = 1.0) -> float:
        """``wanted`` capped by what is left (never below ``floor``)."""
        return max(floor, min(float(wanted), self.remaining()))


# --------------------------------------------------------------------------
# time plan and termination
# --------------------------------------------------------------------------


class _Terminated(BaseException):
    pass


def _on_sigterm(signum, frame):  # pragma: no cover - signal path
    raise _Terminated(f"signal {signum}")


def start_limit_s(remaining: float, n_left: int, start_timeout: float,
                  reserve: float = FINAL_RESERVE_S) -> float:
    """Seconds this server's start may take: ``start_timeout``, capped so that each of
    the ``n_left - 1`` later backends keeps ``LATER_BACKEND_MIN_S`` (or an equal share of
    the time left, if that is smaller)."""
    left = remaining - reserve
    share = left / max(1, n_left)
    later_min = min(LATER_BACKEND_MIN_S, share)
    return max(0.0, min(float(start_timeout), left - later_min * (n_left - 1)))


def phase_time_s(remaining: float, n_left: int, start_s: float, reserve: float = FINAL_RESERVE_S) -> float:
    """Seconds for this backend's phases once its server is up: an equal share of what is
    left after the later backends' server starts, each guessed as this start's duration
    ``start_s`` but at most ``LATER_START_EST_S`` (a warm start; the first start on a
    fresh machine JIT-compiles FlashInfer and is no guide).

    On a warm machine this is the old equal share (start included); after a slow first
    start the overrun is shared by all backends left.
    """
    later = min(LATER_START_EST_S, max(0.0, start_s)) * (n_left - 1)
    return max(0.0, (remaining - reserve - later) / max(1, n_left))

"""Synthetic chat prompts for the load tests (built locally, nothing downloaded).

Lengths are in *words* from a list of common English words that Llama-3's and most BPE
tokenizers encode as one token each (a leading space plus the word), so a prompt of N words is
about N tokens plus the chat template's few dozen. The server's exact prompt token counts come
back in each stream's ``usage``.

Scenarios (``--scenario``, weighted ``name:weight`` list, e.g. ``long:3,shared-prefix:1``):

- ``long``: long-context mix, prompt lengths drawn from ``LONG_MIX``: 40% 1K-4K words,
  30% 4K-16K, 20% 16K-32K, 10% 32K-64K, log-uniform inside each bucket (capped by
  ``--max-prompt-words``, default 64K);
- ``shared-prefix``: one of ``--prefix-count`` documents of ``--prefix-words`` words followed by a
  unique question: requests share a radix-cache prefix;
- ``cross-budget``: prompts of ``[budget/2, budget - 64)`` words that decode past the budget
  (``max_tokens`` >= budget - prompt + ``--past-budget``, with ``ignore_eos``): dense decode turns
  sparse in the middle of the request.

Disconnects are not a scenario but a fraction of every scenario's requests
(``--disconnect-fraction``): those clients close the stream after a random number of tokens.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Optional

WORDS = (
    "the of and to in is was for on that with as by at from his her an are this be which it not "
    "or have one had but were all their they new can there has more first two been who other "
    "time she would when into after about also some people over most many up out only city so "
    "year three what its world part state school work life may made later day water "
    "long under house page see name war high where each team good while both film well here "
    "game home end group then place now set north south east west left right light music book "
    "river family line old small large great number court field early point air power open "
    "king church green black white red blue road park town land sea story head body hand"
).split()

# (share, low, high) in words: the long-context mix up to 64K.
LONG_MIX: tuple[tuple[float, int, int], ...] = (
    (0.40, 1024, 4096),
    (0.30, 4096, 16384),
    (0.20, 16384, 32768),
    (0.10, 32768, 65536),
)
SCENARIOS = ("long", "shared-prefix", "cross-budget")
QUESTION = "Answer in detail: summarise the text above, then continue the story it tells."


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choices(WORDS, k=max(0, n)))


def draw_long_length(rng: random.Random, max_words: int = 65536) -> int:
    """A prompt length (words) from ``LONG_MIX``, log-uniform within the drawn bucket."""
    share, low, high = rng.choices(LONG_MIX, weights=[m[0] for m in LONG_MIX])[0]
    high = min(high, max_words)
    low = min(low, high)
    return int(round(math.exp(rng.uniform(math.log(low), math.log(high)))))


def parse_weights(text: str) -> list[tuple[str, float]]:
    """``long:3,shared-prefix:1`` -> [("long", 3.0), ("shared-prefix", 1.0)]."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, weight = part.partition(":")
        if name not in SCENARIOS:
            raise ValueError(f"--scenario: unknown scenario {name!r}; choose from {', '.join(SCENARIOS)}")
        try:
            value = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"--scenario: weight of {name!r} must be a number, got {weight!r}") from None
        if value <= 0:
            raise ValueError(f"--scenario: weight of {name!r} must be > 0, got {weight!r}")
        out.append((name, value))
    if not out:
        raise ValueError("--scenario: give at least one scenario")
    return out


@dataclass(frozen=True)
class Plan:
    """One request: its scenario, messages, output length and when (if) the client disconnects."""

    scenario: str
    messages: list
    max_tokens: int
    prompt_words: int
    disconnect_after: Optional[int] = None  # close the stream after this many content chunks


@dataclass
class Options:
    scenario: str = "long:1"
    max_tokens: int = 256
    max_prompt_words: int = 65536
    prefix_count: int = 4
    prefix_words: int = 8192
    budget: int = 2688  # tokenselect's default n_init + topk + n_local
    past_budget: int = 512
    disconnect_fraction: float = 0.0
    seed: int = 0


class PromptFactory:
    """Draws request plans; one per Locust user (its own RNG, seeded from ``seed`` and the user)."""

    def __init__(self, options: Options, user_index: int = 0):
        self.options = options
        self.weights = parse_weights(options.scenario)
        if not 0.0 <= options.disconnect_fraction <= 1.0:
            raise ValueError(f"--disconnect-fraction must be in [0, 1], got {options.disconnect_fraction}")
        self.rng = random.Random(f"{options.seed}/{user_index}")
        self.counter = 0
        # Shared documents depend on the seed only: every user sends the same prefixes.
        doc_rng = random.Random(f"{options.seed}/prefix")
        self.prefixes = [f"Document {i}.\n" + words(doc_rng, options.prefix_words)
                         for i in range(options.prefix_count)]
        self.user_index = user_index

    def unique_header(self) -> str:
        self.counter += 1  # a unique first line: no accidental radix sharing between requests
        return f"Request {self.user_index}-{self.counter}-{self.rng.getrandbits(48):x}.\n"

    def next(self) -> Plan:
        opts, rng = self.options, self.rng
        scenario = rng.choices([w[0] for w in self.weights], weights=[w[1] for w in self.weights])[0]
        max_tokens = opts.max_tokens
        if scenario == "long":
            n = draw_long_length(rng, opts.max_prompt_words)
            content = self.unique_header() + words(rng, n) + "\n" + QUESTION
        elif scenario == "shared-prefix":
            n = opts.prefix_words + 64
            content = rng.choice(self.prefixes) + "\n" + self.unique_header() + words(rng, 64) + "\n" + QUESTION
        else:  # cross-budget
            n = rng.randrange(max(1, opts.budget // 2), max(2, opts.budget - 64))
            content = self.unique_header() + words(rng, n) + "\n" + QUESTION
            max_tokens = max(max_tokens, opts.budget - n + opts.past_budget)
        disconnect = None
        if rng.random() < opts.disconnect_fraction:
            disconnect = rng.randint(1, max(1, max_tokens // 2))
        return Plan(scenario=scenario, messages=[{"role": "user", "content": content}],
                    max_tokens=max_tokens, prompt_words=n, disconnect_after=disconnect)

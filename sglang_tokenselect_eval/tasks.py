"""Synthetic long-context retrieval tasks, sized in the model's own tokens.

Three generators, each deterministic from ``seed``:

* ``passkey``  - the TokenSelect paper's demo: a pass key hidden in repeated filler
  ("The grass is green. The sky is blue. ...") and the question "What is the pass key?".
* ``multikey`` - multi-key needle in a haystack (RULER's niah_multikey): several needles
  "One of the special magic numbers for <word> is: NNNNNNN." in the filler, one asked.
* ``kv``       - InfiniteBench's kv_retrieval: a JSON object of random UUID pairs, the
  value of one key asked.

Lengths and depths are measured on the prompt **as the model sees it**: by default the
user message wrapped by the tokenizer's chat template with the generation prompt appended
(what an OpenAI-compatible ``/v1/chat/completions`` server feeds the model), tokenized
with ``add_special_tokens=False`` (the template already holds the special tokens). With
``chat_template=False`` the bare user text is measured instead.

``token_length`` is within 1% of the asked length (usually within a few tokens) and the
needle's first token sits at ``depth * token_length`` (``needle_depth`` reports the value
reached; within a few tokens for the filler tasks, within ~1.5% of the length for ``kv``,
whose JSON pairs are ~70 tokens each), except where the prompt's own framing makes that impossible: at depth 0 the
needle opens the haystack (after the template and the instruction), at depth 1 it closes
it (before the question); ``haystack_token_span`` gives those limits.

The pass-key and multi-key questions carry a one-sentence answer-format hint by default
(``hint=False`` drops it): without it SmolLM2-135M answers "What is the pass key?" with a
made-up definition unless the needle is near the end; with it, dense attention read the
key right on 30 of 32 random 2K prompts (depths anywhere in [0, 1]) in our runs.

Scoring (:func:`score_answer`) is exact match: the expected answer must appear in the
stripped output, not glued to further letters or digits (so ``714321`` does not count as
``71432``).
"""

from __future__ import annotations

import bisect
import random
import re
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Sequence

TASKS: tuple[str, ...] = ("passkey", "multikey", "kv")

PASSKEY_NOISE: tuple[str, ...] = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
PASSKEY_INSTRUCTION = (
    "There is an important info hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about the important information there."
)
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key?"
# Answer-format hints (on by default, see the module docstring).
PASSKEY_HINT = "Answer with the 5-digit number only."

MULTIKEY_INSTRUCTION = (
    "Some special magic numbers are hidden within the following text. "
    "Make sure to memorize it. I will quiz you about the numbers afterwards."
)
MULTIKEY_NEEDLE = "One of the special magic numbers for {word} is: {number}."
MULTIKEY_QUESTION = "What is the special magic number for {word} mentioned in the provided text?"
MULTIKEY_HINT = "Answer with the 7-digit number only."

KV_INSTRUCTION = "Extract the value corresponding to the specified key in the JSON object below."
KV_QUESTION = 'Key: "{key}"\nThe value associated with the specified key is:'

_ADJECTIVES = (
    "quiet", "bright", "ancient", "brave", "calm", "clever", "crimson", "curious", "daring",
    "eager", "fancy", "gentle", "golden", "hidden", "humble", "icy", "jolly", "lively",
    "lucky", "mighty", "misty", "noble", "proud", "rapid", "rustic", "silent", "silver",
    "sleepy", "smooth", "sunny", "swift", "tender", "tiny", "velvet", "wild", "witty",
)
_NOUNS = (
    "river", "falcon", "meadow", "lantern", "harbor", "orchard", "canyon", "compass",
    "glacier", "island", "kettle", "ladder", "mirror", "needle", "otter", "pebble",
    "quarry", "rocket", "saddle", "thistle", "tunnel", "valley", "walnut", "willow",
    "anchor", "beacon", "candle", "dragon", "forest", "garden", "hammer", "jungle",
)

LENGTH_TOLERANCE = 0.01


@dataclass
class TaskSample:
    """One prompt of a retrieval task.

    Attributes:
        task: ``passkey``, ``multikey`` or ``kv``.
        messages: chat messages (one user message) to send.
        expected: the answer string.
        target_length: tokens asked for.
        token_length: tokens of the prompt as measured (see the module docstring).
        depth: the asked needle depth in [0, 1].
        needle_token_pos: index of the asked needle's first token in the measured prompt.
        needle_token_len: tokens the asked needle spans.
        haystack_token_span: [start, end) token range of the haystack (filler + needles).
        seed: the seed it was drawn from.
        chat_template: whether lengths count the chat template.
    """

    task: str
    messages: list[dict[str, str]]
    expected: str
    target_length: int
    token_length: int
    depth: float
    needle_token_pos: int
    needle_token_len: int
    haystack_token_span: tuple[int, int]
    seed: int
    chat_template: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        """The user message text."""
        return self.messages[-1]["content"]

    @property
    def needle_depth(self) -> float:
        """Depth reached: ``needle_token_pos / token_length``."""
        return self.needle_token_pos / self.token_length

    def score(self, output: str) -> bool:
        return score_answer(output, self.expected)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["needle_depth"] = self.needle_depth
        d["haystack_token_span"] = list(self.haystack_token_span)
        return d


def score_answer(output: Optional[str], expected: str) -> bool:
    """Exact match: ``expected`` occurs in the stripped output, not inside a longer word."""
    if output is None:
        return False
    text = output.strip()
    pattern = r"(?<![0-9A-Za-z])" + re.escape(expected.strip()) + r"(?![0-9A-Za-z])"
    return re.search(pattern, text) is not None


# --------------------------------------------------------------------------- measuring


class _Measurer:
    """Renders a user message as the model sees it and maps characters to tokens."""

    def __init__(self, tokenizer, chat_template: bool = True):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        if chat_template and not getattr(tokenizer, "chat_template", None):
            raise ValueError("tokenizer has no chat template; pass chat_template=False")

    def render(self, content: str) -> str:
        if not self.chat_template:
            return content
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )

    def measure(self, content: str, spans: Sequence[tuple[int, int]]) -> tuple[int, list[tuple[int, int]]]:
        """Tokens of the rendered prompt, and the token range of each content char span."""
        rendered = self.render(content)
        base = rendered.find(content)
        if base < 0:
            raise ValueError("chat template does not contain the user message verbatim")
        enc = self.tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
        ends = [e for _, e in enc["offset_mapping"]]
        n_tok = len(enc["input_ids"])

        def tok_at(c: int) -> int:  # first token ending after char c
            return min(bisect.bisect_right(ends, c), n_tok)

        out = []
        for start, end in spans:
            t0 = tok_at(base + start)
            t1 = tok_at(base + end - 1) + 1 if end > start else t0
            out.append((t0, min(t1, n_tok)))
        return n_tok, out


def _check_args(length: int, depth: float) -> None:
    if not isinstance(length, int) or length <= 0:
        raise ValueError(f"length must be a positive integer, got {length!r}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth!r}")


def _even_slots(count: int, slots: int) -> list[int]:
    """``count`` distinct indices in ``range(slots)`` spread evenly."""
    count = min(count, slots)
    return sorted({int((j + 0.5) * slots / count) for j in range(count)}) if count else []


def _fail(task: str, length: int, got: int) -> ValueError:
    return ValueError(
        f"{task}: could not fit {length} tokens within {LENGTH_TOLERANCE:.0%} (best {got}); "
        "the length is probably too short for the prompt's framing"
    )


# --------------------------------------------------------------------------- filler tasks


@dataclass
class _Layout:
    prefix: str
    suffix: str
    needle: str
    others: list[tuple[float, bool, str]]  # distractors: (fraction of the haystack, before the needle?, text)
    unit: Callable[[int], str]


def _build_filler(layout: _Layout, n: int, a: int) -> tuple[str, tuple[int, int], tuple[int, int]]:
    """Content, needle char span and haystack char span for n filler units, needle at slot a."""
    # Distractors keep their side of the asked needle (fixed by their fraction vs. the
    # depth), so moving the needle never jumps over one while fitting.
    inserts = []
    for f, before, t in layout.others:
        s = min(int(round(f * n)), n)
        inserts.append((min(s, a), -1, t) if before else (max(s, a), 1, t))
    inserts.append((a, 0, layout.needle))
    inserts.sort(key=lambda x: (x[0], x[1]))
    pieces: list[str] = []
    needle_piece = -1
    k = 0
    for i in range(n + 1):
        while k < len(inserts) and inserts[k][0] == i:
            if inserts[k][1] == 0:
                needle_piece = len(pieces)
            pieces.append(inserts[k][2])
            k += 1
        if i < n:
            pieces.append(layout.unit(i))
    start = len(layout.prefix)
    pos = start
    needle_span = (0, 0)
    for j, p in enumerate(pieces):
        if j == needle_piece:
            needle_span = (pos, pos + len(p))
        pos += len(p) + 1
    hay = " ".join(pieces)
    content = layout.prefix + hay + layout.suffix
    return content, needle_span, (start, start + len(hay))


def _fit_filler(task: str, meas: _Measurer, layout: _Layout, length: int, depth: float):
    probe = " ".join(layout.unit(i) for i in range(200))
    tpu = max(len(meas.tokenizer(probe, add_special_tokens=False)["input_ids"]) / 200, 1.0)
    content, ns, hs = _build_filler(layout, 0, 0)
    overhead, _ = meas.measure(content, [])
    n = max(0, int(round((length - overhead) / tpu)))
    a = int(round(depth * n))
    best = None
    seen = set()
    for _ in range(40):
        a = min(max(a, 0), n)
        if (n, a) in seen:
            break
        seen.add((n, a))
        content, ns, hs = _build_filler(layout, n, a)
        total, (needle_tok, hay_tok) = meas.measure(content, [ns, hs])
        lo, hi = hay_tok[0], max(hay_tok[0], hay_tok[1] - (needle_tok[1] - needle_tok[0]))
        target_pos = min(max(int(round(depth * total)), lo), hi)
        err_t, err_p = length - total, target_pos - needle_tok[0]
        cost = (abs(err_t) > LENGTH_TOLERANCE * length, abs(err_t) + abs(err_p))
        if best is None or cost < best[0]:
            best = (cost, content, total, needle_tok, hay_tok)
        dn, da = int(round(err_t / tpu)), int(round(err_p / tpu))
        if dn == 0 and da == 0:
            break
        n = max(0, n + dn)
        a = a + da
    _, content, total, needle_tok, hay_tok = best
    if abs(total - length) > LENGTH_TOLERANCE * length:
        raise _fail(task, length, total)
    return content, total, needle_tok, hay_tok


def _sample(task, content, expected, length, total, depth, needle_tok, hay_tok, seed, chat_template,
            extra=None) -> TaskSample:
    """A TaskSample of one user message, from what ``_fit_filler`` measured."""
    return TaskSample(
        task=task,
        messages=[{"role": "user", "content": content}],
        expected=expected,
        target_length=length,
        token_length=total,
        depth=depth,
        needle_token_pos=needle_tok[0],
        needle_token_len=needle_tok[1] - needle_tok[0],
        haystack_token_span=hay_tok,
        seed=seed,
        chat_template=chat_template,
        extra={} if extra is None else extra,
    )


def make_passkey(
    tokenizer, length: int, depth: float, seed: int = 0, *, chat_template: bool = True, hint: bool = True
) -> TaskSample:
    """The paper's pass-key retrieval prompt of ``length`` tokens, needle at ``depth``.

    ``hint`` appends :data:`PASSKEY_HINT` to the question.
    """
    _check_args(length, depth)
    rng = random.Random(f"passkey:{seed}")
    key = str(rng.randint(10000, 99999))
    layout = _Layout(
        prefix=PASSKEY_INSTRUCTION + "\n\n",
        suffix="\n\n" + PASSKEY_QUESTION + (" " + PASSKEY_HINT if hint else ""),
        needle=PASSKEY_NEEDLE.format(key=key),
        others=[],
        unit=lambda i: PASSKEY_NOISE[i % len(PASSKEY_NOISE)],
    )
    meas = _Measurer(tokenizer, chat_template)
    content, total, needle_tok, hay_tok = _fit_filler("passkey", meas, layout, length, depth)
    return _sample("passkey", content, key, length, total, depth, needle_tok, hay_tok, seed,
                   chat_template)


def make_multikey(
    tokenizer,
    length: int,
    depth: float,
    seed: int = 0,
    *,
    num_needles: int = 4,
    chat_template: bool = True,
    hint: bool = True,
) -> TaskSample:
    """Multi-key NIAH: ``num_needles`` magic numbers for distinct words, one asked at ``depth``."""
    _check_args(length, depth)
    if num_needles < 1:
        raise ValueError("num_needles must be >= 1")
    rng = random.Random(f"multikey:{seed}")
    words = rng.sample([f"{a}-{b}" for a in _ADJECTIVES for b in _NOUNS], num_needles)
    numbers = [str(x) for x in rng.sample(range(1_000_000, 10_000_000), num_needles)]
    # Distractors at random fractions of the haystack, kept away from the asked depth.
    fracs: list[float] = []
    while len(fracs) < num_needles - 1:
        f = rng.random()
        if abs(f - depth) >= 0.05:
            fracs.append(f)
    layout = _Layout(
        prefix=MULTIKEY_INSTRUCTION + "\n\n",
        suffix="\n\n" + MULTIKEY_QUESTION.format(word=words[0]) + (" " + MULTIKEY_HINT if hint else ""),
        needle=MULTIKEY_NEEDLE.format(word=words[0], number=numbers[0]),
        others=[
            (f, f < depth, MULTIKEY_NEEDLE.format(word=w, number=x))
            for f, w, x in zip(fracs, words[1:], numbers[1:])
        ],
        unit=lambda i: PASSKEY_NOISE[i % len(PASSKEY_NOISE)],
    )
    meas = _Measurer(tokenizer, chat_template)
    content, total, needle_tok, hay_tok = _fit_filler("multikey", meas, layout, length, depth)
    return _sample("multikey", content, numbers[0], length, total, depth, needle_tok, hay_tok, seed,
                   chat_template, extra={"key": words[0], "distractors": dict(zip(words[1:], numbers[1:]))})


# --------------------------------------------------------------------------- kv retrieval

# Separators between JSON entries and their token cost relative to ", " (SmolLM2's BPE
# merges '","' into one token and spends one more on a newline); used to fine-tune length
# and needle position a token at a time without touching the content.
_SEP_SHORT, _SEP, _SEP_LONG, _SEP_LONGER = ",", ", ", ",\n", ",\n\n"  # -1, 0, +1, +2 tokens


def _build_kv(prefix, suffix, pairs, needle, i, seps):
    entries = [f'"{k}": "{v}"' for k, v in pairs]
    entries.insert(i, f'"{needle[0]}": "{needle[1]}"')
    parts = ["{"]
    needle_start = 0
    for j, e in enumerate(entries):
        if j:
            parts.append(seps[j - 1])
        if j == i:
            needle_start = len(prefix) + sum(map(len, parts))
        parts.append(e)
    parts.append("}")
    body = "".join(parts)
    content = prefix + body + suffix
    needle_len = len(entries[i])
    return content, (needle_start, needle_start + needle_len), (len(prefix), len(prefix) + len(body))


def _seps_for(n_sep: int, i: int, before: int, after: int) -> list[str]:
    """Separators of the ``i`` gaps before the needle and of the others, lengthened by ``before``
    and ``after`` tokens in all (shortened where negative); a gap gives -1 to +2 tokens."""
    seps = [_SEP] * n_sep
    for count, lo, hi in ((before, 0, i), (after, i, n_sep)):
        slots = hi - lo
        if count < 0:
            for s in _even_slots(-count, slots):
                seps[lo + s] = _SEP_SHORT
            continue
        doubles = max(0, count - slots)
        for sep, k in ((_SEP_LONG, count - doubles), (_SEP_LONGER, doubles)):
            for s in _even_slots(k, slots):
                seps[lo + s] = sep
    return seps


def make_kv(tokenizer, length: int, depth: float, seed: int = 0, *, chat_template: bool = True) -> TaskSample:
    """InfiniteBench kv_retrieval: JSON of random UUID pairs, one key asked, at ``depth``."""
    _check_args(length, depth)
    rng = random.Random(f"kv:{seed}")

    def new_uuid() -> str:
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))

    needle = (new_uuid(), new_uuid())
    prefix = KV_INSTRUCTION + "\n\nJSON data:\n"
    suffix = "\n\n" + KV_QUESTION.format(key=needle[0])
    pairs = [(new_uuid(), new_uuid()) for _ in range(max(8, length // 40))]
    meas = _Measurer(tokenizer, chat_template)

    probe = ", ".join(f'"{k}": "{v}"' for k, v in pairs[:40])
    tpp = len(tokenizer(probe, add_special_tokens=False)["input_ids"]) / min(40, len(pairs))
    content, _, _ = _build_kv(prefix, suffix, [], needle, 0, [])
    overhead, _ = meas.measure(content, [])
    n = max(0, int(round((length - overhead) / tpp)))
    i = int(round(depth * n))

    def evaluate(n, i, before=0, after=0):
        i = min(max(i, 0), n)
        seps = _seps_for(n, i, before, after)
        content, ns, hs = _build_kv(prefix, suffix, pairs[:n], needle, i, seps)
        total, (needle_tok, hay_tok) = meas.measure(content, [ns, hs])
        lo, hi = hay_tok[0], max(hay_tok[0], hay_tok[1] - (needle_tok[1] - needle_tok[0]))
        target_pos = min(max(int(round(depth * total)), lo), hi)
        return content, total, needle_tok, hay_tok, length - total, target_pos - needle_tok[0]

    # Coarse: whole pairs.
    seen = set()
    for _ in range(20):
        n = min(max(n, 0), len(pairs))
        i = min(max(i, 0), n)
        if (n, i) in seen:
            break
        seen.add((n, i))
        *_, err_t, err_p = evaluate(n, i)
        dn, di = int(round(err_t / tpp)), int(round(err_p / tpp))
        if dn == 0 and di == 0:
            break
        n, i = n + dn, i + di
    # Fine: separators, one token at a time, around the best few (n, i).
    def solve(n, i, want_b, want_t):
        """Separator changes (before, after) closest to the wanted needle shift and total."""
        b = max(-i, min(2 * i, want_b))
        a = max(-(n - i), min(2 * (n - i), want_t - b))
        if b + a != want_t:  # the total comes first: give up some needle shift
            b = max(-i, min(2 * i, want_t - a))
        return b, a

    best = None
    for cn in range(max(n - 1, 0), min(n + 1, len(pairs)) + 1):
        for ci in range(max(i - 1, 0), min(i + 1, cn) + 1):
            before = after = 0
            for _ in range(6):
                content, total, needle_tok, hay_tok, err_t, err_p = evaluate(cn, ci, before, after)
                cost = (abs(err_t) > LENGTH_TOLERANCE * length, abs(err_p) + abs(err_t))
                if best is None or cost < best[0]:
                    best = (cost, content, total, needle_tok, hay_tok, cn + 1)
                nb, na = solve(cn, ci, before + err_p, before + after + err_t)
                if (nb, na) == (before, after):
                    break
                before, after = nb, na
    _, content, total, needle_tok, hay_tok, num_pairs = best
    if abs(total - length) > LENGTH_TOLERANCE * length:
        raise _fail("kv", length, total)
    return _sample("kv", content, needle[1], length, total, depth, needle_tok, hay_tok, seed,
                   chat_template, extra={"key": needle[0], "num_pairs": num_pairs})


_MAKERS = {"passkey": make_passkey, "multikey": make_multikey, "kv": make_kv}


def make_sample(task: str, tokenizer, length: int, depth: float, seed: int = 0, **kwargs) -> TaskSample:
    """Dispatch to the generator of ``task`` (one of :data:`TASKS`)."""
    try:
        maker = _MAKERS[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}") from None
    return maker(tokenizer, length, depth, seed, **kwargs)


def depth_grid(count: int) -> list[float]:
    """``count`` evenly spaced depths from 0 to 1 (``[0.5]`` for a count of 1)."""
    if count < 1:
        raise ValueError("count must be >= 1")
    if count == 1:
        return [0.5]
    return [round(j / (count - 1), 6) for j in range(count)]

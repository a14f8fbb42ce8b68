"""Locust load test for an OpenAI-compatible chat server that streams (SGLang, tokenselect or not).

Locust times a streamed POST only up to its response headers, so each request also fires its
own request events (request type / name):

- ``TTFT`` / scenario: request sent to first content token;
- ``TPOT`` / scenario: (end-to-end - TTFT) / (output tokens - 1), the time per output token;
- ``ITL`` / scenario: every gap between two content chunks (one event per token);
- ``E2E`` / scenario: request sent to the end of the stream (failures land here);
- ``DISCONNECT`` / scenario: an intended mid-stream disconnect (a success, not a failure).

Output tokens are the server's ``usage.completion_tokens`` when it sends usage, else the
content chunks counted. Scenarios and prompt lengths: see ``prompts.py``.

Headless run (CSV and HTML written):

    locust -f loadtest/locustfile.py --headless -u 32 -r 4 -t 5m --host http://127.0.0.1:30000 \\
        --scenario long:3,shared-prefix:1,cross-budget:1 --disconnect-fraction 0.25 \\
        --csv results/tokenselect --html results/tokenselect.html
"""

from __future__ import annotations

import itertools
import json
import logging
import time

from locust import HttpUser, events, task

from prompts import Options, PromptFactory

logger = logging.getLogger(__name__)

CHAT_PATH = "/v1/chat/completions"
_user_ids = itertools.count()


@events.init_command_line_parser.add_listener
def add_arguments(parser):
    group = parser.add_argument_group("chat streaming (loadtest/locustfile.py)")
    defaults = Options()
    group.add_argument("--scenario", default=defaults.scenario,
                       help="Weighted scenarios: long, shared-prefix, cross-budget, e.g. 'long:3,shared-prefix:1'.")
    group.add_argument("--model", default="default", help="The request's model field (SGLang accepts 'default').")
    group.add_argument("--max-tokens", type=int, default=defaults.max_tokens, help="Output tokens per request.")
    group.add_argument("--max-prompt-words", type=int, default=defaults.max_prompt_words,
                       help="Cap of the long-context mix (words ~ tokens), default 64K.")
    group.add_argument("--prefix-count", type=int, default=defaults.prefix_count,
                       help="shared-prefix: number of shared documents.")
    group.add_argument("--prefix-words", type=int, default=defaults.prefix_words,
                       help="shared-prefix: words per shared document.")
    group.add_argument("--budget", type=int, default=defaults.budget,
                       help="cross-budget: the server's tokenselect budget n_init + topk + n_local.")
    group.add_argument("--past-budget", type=int, default=defaults.past_budget,
                       help="cross-budget: tokens decoded past the budget (at least).")
    group.add_argument("--disconnect-fraction", type=float, default=defaults.disconnect_fraction,
                       help="Fraction of requests whose client disconnects mid-stream.")
    group.add_argument("--no-ignore-eos", action="store_true",
                       help="Let the model stop at EOS (default: ignore_eos, fixed output lengths).")
    group.add_argument("--prompt-seed", type=int, default=defaults.seed, help="Seed of the synthetic prompts.")


def options_from(parsed) -> Options:
    return Options(scenario=parsed.scenario, max_tokens=parsed.max_tokens,
                   max_prompt_words=parsed.max_prompt_words, prefix_count=parsed.prefix_count,
                   prefix_words=parsed.prefix_words, budget=parsed.budget, past_budget=parsed.past_budget,
                   disconnect_fraction=parsed.disconnect_fraction, seed=parsed.prompt_seed)


@events.test_start.add_listener
def check_options(environment, **kwargs):
    PromptFactory(options_from(environment.parsed_options))  # bad options fail before any user runs


def fire(environment, request_type: str, name: str, ms: float, exception=None, length: int = 0) -> None:
    environment.events.request.fire(request_type=request_type, name=name, response_time=ms,
                                    response_length=length, exception=exception, context={})


def parse_sse(line: bytes):
    """The JSON of one ``data:`` line; None for keep-alives, ``[DONE]`` and other lines."""
    if not line.startswith(b"data:"):
        return None
    data = line[5:].strip()
    if not data or data == b"[DONE]":
        return None
    return json.loads(data)


class StreamError(Exception):
    """The stream broke or the server sent an error."""


class ChatStreamUser(HttpUser):
    """One client: sends streamed chat completions back to back."""

    def on_start(self):
        self.options = options_from(self.environment.parsed_options)
        self.factory = PromptFactory(self.options, next(_user_ids))
        self.ignore_eos = not self.environment.parsed_options.no_ignore_eos

    @task
    def chat(self):
        plan = self.factory.next()
        body = {"model": self.environment.parsed_options.model, "messages": plan.messages,
                "max_tokens": plan.max_tokens, "temperature": 0.0, "stream": True,
                "stream_options": {"include_usage": True}}
        if self.ignore_eos:
            body["ignore_eos"] = True  # SGLang's sampling extension: fixed output lengths
        start = time.perf_counter()
        last = first = None
        chunks = usage_tokens = 0
        name = plan.scenario
        try:
            with self.client.post(CHAT_PATH, json=body, stream=True, name=f"chat headers ({name})",
                                  catch_response=True) as response:
                if response.status_code != 200:
                    response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
                    return
                response.success()
                for line in response.iter_lines():
                    event = parse_sse(line)
                    if event is None:
                        continue
                    if "error" in event:
                        raise StreamError(str(event["error"])[:200])
                    if event.get("usage"):
                        usage_tokens = event["usage"].get("completion_tokens") or usage_tokens
                    if not any((c.get("delta") or {}).get("content") for c in event.get("choices") or []):
                        continue
                    now = time.perf_counter()
                    if first is None:
                        first = now
                        fire(self.environment, "TTFT", name, (now - start) * 1000)
                    else:
                        fire(self.environment, "ITL", name, (now - last) * 1000)
                    last = now
                    chunks += 1
                    if plan.disconnect_after is not None and chunks >= plan.disconnect_after:
                        response.close()  # unread body: closes the socket mid-stream
                        break
        except Exception as exc:  # noqa: BLE001 (any client error is this request's failure)
            fire(self.environment, "E2E", name, (time.perf_counter() - start) * 1000, exception=exc)
            return
        end = time.perf_counter()
        if plan.disconnect_after is not None and chunks >= plan.disconnect_after:
            fire(self.environment, "DISCONNECT", name, (end - start) * 1000, length=chunks)
            return
        if first is None:
            fire(self.environment, "E2E", name, (end - start) * 1000,
                 exception=StreamError("the stream ended without a content token"))
            return
        tokens = max(usage_tokens, chunks)
        if tokens > 1:
            fire(self.environment, "TPOT", name, (end - first) * 1000 / (tokens - 1))
        fire(self.environment, "E2E", name, (end - start) * 1000, length=tokens)

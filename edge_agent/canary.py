"""The canary of a model activation (issue #14): golden prompts, decode speed against the previous
model measured the same way in the same activation, and memory. Runs on the executor's worker
thread between commands (edge_agent/model_deploy.py); the checks of a text are pure functions.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from autoglm_wire.model_command import Canary, CanaryPrompt
from autoglm_wire.protocol import ChatMessage, ChatParams, CompleteParams
from edge_agent.engine import Generation, TextEngine

SPEED_PROMPT = "The quick brown fox jumps over the lazy dog. Then it"  # the fixed prompt of the speed check
SPEED_TOKENS = 32


def rss_mb() -> float:
    """Resident set size of this process in MiB (Linux /proc)."""
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
    except OSError:
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)


def measure_speed(engine: TextEngine) -> float:
    """Decode tokens/s of `engine` on the fixed prompt (greedy, SPEED_TOKENS tokens)."""
    params = CompleteParams(prompt=SPEED_PROMPT, max_tokens=SPEED_TOKENS, temperature=0.0, seed=0)
    return engine.complete(params, None, threading.Event()).tokens_per_s


def text_problem(text: str, prompt: CanaryPrompt) -> str | None:
    """Why a golden prompt's text fails its regex or JSON schema, or None. Pure."""
    if prompt.regex is not None and re.search(prompt.regex, text) is None:
        return f"the text does not match the regex {prompt.regex!r}"
    if prompt.json_schema is not None:
        import jsonschema  # only when a canary asks for it (the agent's import footprint stays small)

        try:
            value = json.loads(text)
        except ValueError as exc:
            return f"the text is not JSON ({exc.msg} at position {exc.pos})"
        try:
            jsonschema.validate(value, prompt.json_schema)
        except jsonschema.ValidationError as exc:
            return f"the JSON does not validate against the schema: {exc.message}"
        except jsonschema.SchemaError as exc:
            return f"the canary's json_schema is not a valid schema: {exc.message}"
    return None


def speed_problem(tokens_per_s: float, baseline: float | None, min_ratio: float) -> str | None:
    """Why the new model's decode speed fails the check, or None. No baseline (the previous model
    could not be measured): nothing to compare with, passed. Pure."""
    if baseline is None or baseline <= 0 or min_ratio <= 0:
        return None
    if tokens_per_s < min_ratio * baseline:
        return (f"decode speed {tokens_per_s:.1f} tokens/s is below {min_ratio:g} x the previous model's "
                f"{baseline:.1f} tokens/s")
    return None


@dataclass
class CanaryResult:
    passed: bool
    reason: str | None
    results: list[dict[str, Any]] = field(default_factory=list)
    tokens_per_s: float | None = None
    baseline_tokens_per_s: float | None = None
    rss_mb: float | None = None

    def summary(self) -> dict[str, Any]:
        return {"passed": self.passed, "reason": self.reason, "results": self.results,
                "tokens_per_s": self.tokens_per_s, "baseline_tokens_per_s": self.baseline_tokens_per_s,
                "rss_mb": self.rss_mb}


def _generate(engine: TextEngine, prompt: CanaryPrompt, cancel: threading.Event) -> Generation:
    common: dict[str, Any] = {"max_tokens": prompt.max_tokens, "temperature": 0.0, "seed": 0}
    if prompt.messages is not None:
        messages = [ChatMessage(role=m.role, content=m.content) for m in prompt.messages]
        return engine.chat(ChatParams(messages=messages, **common), None, cancel)
    assert prompt.prompt is not None
    return engine.complete(CompleteParams(prompt=prompt.prompt, **common), None, cancel)


def run_prompt(engine: TextEngine, index: int, prompt: CanaryPrompt) -> dict[str, Any]:
    """One golden prompt on `engine`, stopped at its `timeout_s`: {index, passed, reason, ...}."""
    cancel = threading.Event()
    timer = threading.Timer(prompt.timeout_s, cancel.set)
    timer.start()
    started = time.monotonic()
    try:
        generation = _generate(engine, prompt, cancel)
    except Exception as exc:  # noqa: BLE001 - whatever the new model does wrong fails its canary
        return {"index": index, "passed": False, "reason": f"generation failed: {exc}"}
    finally:
        timer.cancel()
    seconds = round(time.monotonic() - started, 3)
    result: dict[str, Any] = {"index": index, "tokens": generation.completion_tokens, "seconds": seconds,
                              "text": generation.text[:200]}
    if generation.finish_reason == "cancelled":
        reason: str | None = f"prompt {index} did not finish within {prompt.timeout_s:g} s"
    elif generation.completion_tokens < 1:
        reason = f"prompt {index} produced no tokens"
    else:
        problem = text_problem(generation.text, prompt)
        reason = None if problem is None else f"prompt {index}: {problem}"
    return {**result, "passed": reason is None, "reason": reason}


def run_canary(engine: TextEngine, canary: Canary, baseline: float | None) -> CanaryResult:
    """Memory first (the model just loaded), then the golden prompts, then the speed check."""
    outcome = CanaryResult(passed=True, reason=None, baseline_tokens_per_s=baseline, rss_mb=round(rss_mb(), 1))
    if canary.max_rss_mb is not None and outcome.rss_mb is not None and outcome.rss_mb > canary.max_rss_mb:
        outcome.reason = f"agent RSS {outcome.rss_mb:.0f} MiB after the load is above max_rss_mb {canary.max_rss_mb}"
    for index, prompt in enumerate(canary.prompts):
        result = run_prompt(engine, index, prompt)
        outcome.results.append(result)
        if outcome.reason is None and not result["passed"]:
            outcome.reason = result["reason"]
    try:
        outcome.tokens_per_s = round(measure_speed(engine), 3)
    except Exception as exc:  # noqa: BLE001
        outcome.reason = outcome.reason or f"the speed check failed: {exc}"
    else:
        outcome.reason = outcome.reason or speed_problem(outcome.tokens_per_s, baseline, canary.min_speed_ratio)
    outcome.passed = outcome.reason is None
    return outcome

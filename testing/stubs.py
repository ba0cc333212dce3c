"""Deterministic stand-ins for an LLM, for tests, benchmarks and demos ("instant backend").

`RuleStubBackend` reads the prompts this project sends (workers/prompts.py) and answers by a rule:
- as explainer, it names the rule from a small vocabulary (digits, closing parentheses, the word "the", ...)
  that best fits the shown activations;
- as simulator, it predicts 10 on the tokens matching the rule its explanation names and 0 elsewhere, in all
  three modes (prompt logprobs put their mass on "10" or "0"; chat answers echo the aligned format);
- as detection/fuzzing judge, it answers 1 where a window holds (or the highlights are) matching tokens.
It never sleeps and does only string work, so an orchestrator benchmark can push 300k neurons through it.

`ScriptedBackend` replays fixed answers (for parse and retry tests). `pydoc_windows` and `planted_neuron`
build synthetic neurons defined by a rule on the real default corpus, for the planted-neuron test and bench.
"""
from __future__ import annotations

import math
import random
import re
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from workers.llm.backends.base import (
    Capabilities,
    ChatResponse,
    PromptLogprobsResponse,
    TokenAlternatives,
    UnsupportedError,
    Usage,
)
from workers.method.prompts import (
    DETECTION_SYSTEM,
    EXPLAINER_SYSTEM,
    FUZZING_SYSTEM,
    HIGHLIGHT_CLOSE,
    HIGHLIGHT_OPEN,
    LEAD_IN,
    SIMULATOR_CHAT_SYSTEM,
    unescape_token,
)
from workers.method.records import ActivationRecord, NeuronRecords
from workers.method.scoring import correlation_score


# --- the rule vocabulary ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    name: str
    phrase: str  # how the stub explainer words it
    keywords: tuple[str, ...]  # any of these in an explanation means this rule (lower case)
    match: Callable[[str], bool]


RULES: dict[str, Rule] = {r.name: r for r in (
    Rule("digits", "digits and numbers written with digits", ("digit",), lambda t: any(c.isdigit() for c in t)),
    Rule("closing_paren", "closing parentheses", ("closing paren",), lambda t: ")" in t),
    Rule("opening_paren", "opening parentheses", ("opening paren",), lambda t: "(" in t),
    Rule("the", 'the word "the"', ('word "the"', "word 'the'"), lambda t: t.strip().lower() == "the"),
    Rule("of", 'the word "of"', ('word "of"', "word 'of'"), lambda t: t.strip().lower() == "of"),
    Rule("comma", "commas", ("comma",), lambda t: "," in t),
    Rule("period", "periods", ("period",), lambda t: t.strip() == "."),
    Rule("colon", "colons", ("colon",), lambda t: ":" in t),
    Rule("capitalized", "words that start with a capital letter", ("capital",),
         lambda t: t.strip()[:1].isupper()),
)}


def rule_for(explanation: str) -> Rule | None:
    """The vocabulary rule an explanation names, if any."""
    text = explanation.lower()
    return next((r for r in RULES.values() if any(k in text for k in r.keywords)), None)


# --- reading this project's prompts ----------------------------------------------------------------------
_EXPLANATION_RE = re.compile(r"^Explanation: (.*)$", re.MULTILINE)


def _explanation_in(user: str) -> str:
    m = _EXPLANATION_RE.search(user)
    if m is None:
        raise ValueError("the stub backend got a prompt without an 'Explanation:' line")
    return m.group(1)
_MARKER_RE = re.compile(r"^</?text \d+>$")
_SNIPPET_RE = re.compile(r"^Snippet \d+: (.*)$", re.MULTILINE)
_HIGHLIGHT_RE = re.compile(re.escape(HIGHLIGHT_OPEN) + r"(.*?)" + re.escape(HIGHLIGHT_CLOSE))
_WORDS_RE = re.compile(r"\s*\w+|\s*[^\w\s]")

HIGH, LOW = math.log(0.95), math.log(0.05)  # the stub's confidence in its own 0/10 call


def _token_lines(block: str) -> list[str]:
    return [ln for ln in block.split("\n") if ln and not _MARKER_RE.match(ln) and not ln.startswith("Explanation:")]


class RuleStubBackend:
    """An instant, deterministic LLMBackend that follows the rule named in an explanation."""

    provider = "stub"

    def __init__(self, capabilities: Capabilities | None = None, *, model: str = "rule-stub"):
        self.capabilities = capabilities or Capabilities(chat=True, chat_logprobs=True, prompt_logprobs=True)
        self.model = model
        self.calls = 0

    async def aclose(self) -> None:
        return None

    # -- chat: explainer, simulator (echo format), detection, fuzzing --
    async def chat(self, messages: list[dict], *, max_tokens: int, temperature: float = 0.0,
                   top_logprobs: int | None = None, seed: int | None = None) -> ChatResponse:
        self.calls += 1
        usage = Usage(sum(len(m["content"]) for m in messages) // 4, 0)
        text, pieces = self.answer(messages)
        usage.completion_tokens = len(text) // 4 + 1
        logprobs = pieces if (top_logprobs and self.capabilities.chat_logprobs) else None
        return ChatResponse(text=text, usage=usage, logprobs=logprobs)

    def answer(self, messages: list[dict]) -> tuple[str, list[TokenAlternatives] | None]:
        """The answer text (and its per-token alternatives) to one of this project's chat prompts."""
        system, user = messages[0]["content"], messages[-1]["content"]
        if system == EXPLAINER_SYSTEM:
            return f"{LEAD_IN} {self._explain(user)}.", None
        if system == SIMULATOR_CHAT_SYSTEM:
            return self._simulate_chat(user)
        if system in (DETECTION_SYSTEM, FUZZING_SYSTEM):
            return self._judge(user, fuzzing=system == FUZZING_SYSTEM)
        raise UnsupportedError("the rule stub only answers this project's prompts")

    def _explain(self, user: str) -> str:
        first_block = user.split("\n\nThe same texts again")[0]
        pairs = [ln.rsplit("\t", 1) for ln in _token_lines(first_block) if "\t" in ln]
        tokens = [unescape_token(t) for t, _ in pairs]
        values = [float(v) for _, v in pairs]
        best, best_r = None, 0.0
        for rule in RULES.values():
            hits = [[1.0 if rule.match(t) else 0.0 for t in tokens]]
            r = (correlation_score(hits, [values]) or 0.0) if tokens else 0.0
            if r > best_r:
                best, best_r = rule, r
        return best.phrase if best else "nothing in particular"

    def _simulate_chat(self, user: str) -> tuple[str, list[TokenAlternatives]]:
        rule = rule_for(_explanation_in(user))
        pieces: list[TokenAlternatives] = []
        for line in user.split("\n"):
            if _MARKER_RE.match(line):
                pieces.append(TokenAlternatives(line + "\n", 0.0))
            elif line and not line.startswith("Explanation:"):
                hit = bool(rule and rule.match(unescape_token(line)))
                pieces += [TokenAlternatives(line, 0.0), TokenAlternatives("\t", 0.0),
                           TokenAlternatives("10" if hit else "0", HIGH,
                                             {"10": HIGH if hit else LOW, "0": LOW if hit else HIGH, "?": -9.0}),
                           TokenAlternatives("\n", 0.0)]
        return "".join(p.token for p in pieces), pieces

    def _judge(self, user: str, *, fuzzing: bool) -> tuple[str, list[TokenAlternatives]]:
        rule = rule_for(_explanation_in(user))
        answers = []
        for snippet in _SNIPPET_RE.findall(user):
            if rule is None:
                answers.append(0)
            elif fuzzing:
                marked = [unescape_token(m) for m in _HIGHLIGHT_RE.findall(snippet)]
                answers.append(int(bool(marked) and all(rule.match(m) for m in marked)))
            else:
                answers.append(int(any(rule.match(w) for w in _WORDS_RE.findall(unescape_token(snippet)))))
        pieces = [TokenAlternatives("[", 0.0)]
        for i, a in enumerate(answers):
            pieces.append(TokenAlternatives(str(a), HIGH, {str(a): HIGH, str(1 - a): LOW}))
            pieces.append(TokenAlternatives(", " if i < len(answers) - 1 else "]", 0.0))
        return "".join(p.token for p in pieces), pieces

    # -- prompt logprobs: simulator in the reference mode --
    async def prompt_logprobs(self, prompt: str, offsets: list[int], *, top_k: int) -> PromptLogprobsResponse:
        if not self.capabilities.prompt_logprobs:
            raise UnsupportedError("prompt logprobs are switched off on this stub")
        self.calls += 1
        explanation_at = prompt.rfind("\nExplanation: ", 0, offsets[0] if offsets else len(prompt))
        line_end = prompt.find("\n", explanation_at + 1)
        rule = rule_for(prompt[explanation_at:line_end])
        positions = []
        for offset in offsets:
            token = unescape_token(prompt[prompt.rfind("\n", 0, offset) + 1:offset - 1])
            hit = bool(rule and rule.match(token))
            positions.append({"10": HIGH if hit else LOW, "0": LOW if hit else HIGH, "unknown": -7.0})
        return PromptLogprobsResponse(positions=positions, usage=Usage(len(prompt) // 4, 0))


class ScriptedBackend:
    """Replays the given answers in order (strings, ChatResponses or exceptions to raise); records requests."""

    provider = "scripted"
    model = "scripted"

    def __init__(self, answers: Iterable, capabilities: Capabilities | None = None):
        self.answers = list(answers)
        self.capabilities = capabilities or Capabilities(chat=True)
        self.requests: list[dict] = []

    async def chat(self, messages, *, max_tokens, temperature=0.0, top_logprobs=None, seed=None) -> ChatResponse:
        self.requests.append({"messages": messages, "temperature": temperature, "seed": seed,
                              "top_logprobs": top_logprobs, "max_tokens": max_tokens})
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer if isinstance(answer, ChatResponse) else ChatResponse(answer, Usage(10, 5))

    async def prompt_logprobs(self, prompt, offsets, *, top_k) -> PromptLogprobsResponse:
        self.requests.append({"prompt": prompt, "offsets": offsets, "top_k": top_k})
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    async def aclose(self) -> None:
        return None


# --- planted neurons on the real default corpus ----------------------------------------------------------
_SIMPLE_TOKEN_RE = re.compile(r"\s*\w+|\s*[^\w\s]|\s+")


def pydoc_windows(seq_len: int = 64, max_windows: int | None = 2000) -> list[list[str]]:
    """The default corpus (the standard library's help topics) cut into windows of a simple word/punctuation
    tokenization (a stand-in for the subject model's tokenizer)."""
    import pydoc_data.topics
    text = "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    tokens = _SIMPLE_TOKEN_RE.findall(text)
    windows = [tokens[i:i + seq_len] for i in range(0, len(tokens) - seq_len + 1, seq_len)]
    return windows[:max_windows] if max_windows else windows


def _jitter(seq_id: int, pos: int) -> float:
    return (zlib.crc32(f"{seq_id}:{pos}".encode()) % 1000) / 1000.0


def planted_neuron(rule: str, windows: list[list[str]], *, layer: int = 0, neuron: int = 0, top_k: int = 20,
                   n_random: int = 15, seed: int = 0) -> NeuronRecords:
    """A synthetic neuron that fires (2.0-4.0) on tokens matching `rule` and sits slightly below 0 elsewhere,
    with top and random records chosen as the sweep does (docs/method.md §2)."""
    match = RULES[rule].match

    def acts(seq_id: int, tokens: list[str]) -> list[float]:
        return [2.0 + 2.0 * _jitter(seq_id, i) if match(t) else -0.02 - 0.1 * _jitter(seq_id, i)
                for i, t in enumerate(tokens)]

    all_acts = [acts(i, w) for i, w in enumerate(windows)]
    order = sorted(range(len(windows)), key=lambda i: (-max(all_acts[i]), i))[:top_k]
    top = [ActivationRecord(i, windows[i], all_acts[i], "top", rank) for rank, i in enumerate(order)]
    picks = random.Random(seed).sample(range(len(windows)), n_random)
    rnd = [ActivationRecord(i, windows[i], all_acts[i], "random", rank) for rank, i in enumerate(picks)]
    return NeuronRecords(layer, neuron, top=top, random=rnd)


__all__ = ["RULES", "Rule", "RuleStubBackend", "ScriptedBackend", "planted_neuron", "pydoc_windows", "rule_for"]


class RuleResponder:
    """Makes the OpenAI-compatible test server (workers/testserver.py) answer like the rule stub, so a whole
    sweep can run against a real HTTP endpoint: explanations, simulations (chat, with numeric alternatives at
    each value token for generated-logprob mode), detection and fuzzing."""

    def __init__(self):
        self.stub = RuleStubBackend()

    def chat(self, messages: list[dict], max_tokens: int) -> str:
        return self.stub.answer(messages)[0]

    def top_logprobs(self, context: str, token: str, k: int) -> dict[str, float]:
        value = token.strip()
        if value in ("0", "1", "10"):
            lead = token[:len(token) - len(token.lstrip())]
            other = "10" if value == "0" else "0"
            return {token: HIGH, lead + other: LOW}
        return {token: 0.0} if token else {}

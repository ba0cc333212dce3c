"""Every prompt the method sends, and the parsers for the answers (docs/method.md §4-§6).

The instructions and worked examples are this project's own. One token is shown per line as
`token<TAB>value`; tokens are escaped so that a token holding a newline or tab cannot break that format
(`escape_token`), and the explainer and the simulator share the escaping. The instruction and the worked
examples come first and are identical for every neuron, so a backend can reuse the cached prompt prefix.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from schemas.failures import FailureReason
from workers.llm.backends.base import TransientLLMError
from workers.method.scoring import numeric_value

PROMPT_VERSION = "ns-1"  # stored with every score; bump when a prompt or example changes
LEAD_IN = "The main thing this neuron does is find"
PLACEHOLDER = "unknown"
SPARSE_FRACTION = 0.2  # below this share of non-zero tokens the explainer sees the hits a second time


class MalformedAnswerError(TransientLLMError):
    """The model answered, but not in the asked-for format (misaligned, truncated, empty). Retried by the
    method with another sample; after that the neuron fails. Never scored as zeros."""
    reason = FailureReason.MALFORMED


# --- token escaping --------------------------------------------------------------------------------------
_ESCAPES = {"\n": "⏎", "\t": "⇥", "\r": "␍", "\x0b": "␋", "\x0c": "␌"}
_UNESCAPES = {v: k for k, v in _ESCAPES.items()}
_ESCAPE_TABLE = str.maketrans(_ESCAPES)
_UNESCAPE_TABLE = str.maketrans(_UNESCAPES)


EMPTY_TOKEN = "␀"  # a token that adds no text of its own (the first bytes of a character it shares with the next)


def escape_token(token: str) -> str:
    """A token as one printable line: line breaks and tabs become visible symbols, a token of spaces only
    shows its spaces as '␣', and an empty token (see workers/extract/corpus.py: a character split across tokens
    belongs to the token that completes it) shows as '␀' -- an empty-looking line would be lost."""
    if not token:
        return EMPTY_TOKEN
    shown = token.translate(_ESCAPE_TABLE)
    if shown and not shown.strip(" "):
        shown = shown.replace(" ", "␣")
    return shown


def unescape_token(shown: str) -> str:
    if shown == EMPTY_TOKEN:
        return ""
    return shown.translate(_UNESCAPE_TABLE).replace("␣", " ")


def _sentence(explanation: str) -> str:
    text = explanation.strip()
    return text if text.endswith((".", "!", "?")) else text + "."


# --- the project's worked examples -----------------------------------------------------------------------
@dataclass(frozen=True)
class Example:
    """A short hand-made text with hand-set activations (already on the 0-10 scale)."""
    records: tuple[tuple[tuple[str, int], ...], ...]
    explanation: str

    def tokens(self, i: int) -> list[str]:
        return [t for t, _ in self.records[i]]

    def values(self, i: int) -> list[int]:
        return [v for _, v in self.records[i]]


def _rec(*pairs: tuple[str, int]) -> tuple[tuple[str, int], ...]:
    return tuple(pairs)


YEARS = Example(records=(
    _rec(("The", 0), (" bridge", 0), (" opened", 0), (" in", 1), (" 19", 4), ("32", 10), (" and", 0), (" was", 0),
         (" rebuilt", 0), (" in", 1), (" 19", 5), ("87", 9), (" after", 0), (" the", 0), (" flood", 0), (".", 0)),
    _rec(("Sales", 0), (" fell", 0), (" between", 0), (" 2008", 8), (" and", 0), (" 2010", 9), (",", 0),
         (" then", 0), (" slowly", 0), (" recovered", 0), (".", 0)),
), explanation="years written as numbers, most strongly on the final digits of the year")

DOUBT = Example(records=(
    _rec(("Perhaps", 8), (" the", 0), (" train", 0), (" will", 1), (" be", 0), (" late", 0), (",", 0), (" but", 0),
         (" it", 0), (" might", 10), (" also", 1), (" arrive", 0), (" early", 0), (".", 0)),
    _rec(("I", 0), (" am", 0), (" not", 3), (" sure", 7), (" whether", 4), (" she", 0), (" agreed", 0), (";", 0),
         (" maybe", 9), (" she", 0), (" did", 0), (".", 0)),
), explanation="words that signal doubt or uncertainty about a statement")

BLOCK_COLON = Example(records=(
    _rec(("def", 0), (" area", 0), ("(", 0), ("radius", 0), ("):", 10), ("\n", 2), ("   ", 0), (" return", 0),
         (" 3", 0), (".", 0), ("14", 0), (" *", 0), (" radius", 0), (" **", 0), (" 2", 0), ("\n", 0)),
    _rec(("for", 0), (" item", 0), (" in", 0), (" items", 0), (":", 9), ("\n", 1), ("   ", 0), (" print", 0),
         ("(", 0), ("item", 0), (")", 0), ("\n", 0), ("if", 0), (" done", 0), (":", 8), ("\n", 1)),
), explanation="the colon that ends the header line of a Python block such as a function, loop or if")

EXPLAINER_EXAMPLES = (YEARS, DOUBT, BLOCK_COLON)
SIMULATOR_EXAMPLES = (YEARS, DOUBT)


# --- explainer (docs/method.md §4) ---------------------------------------------------------------------------------
EXPLAINER_SYSTEM = (
    "You are studying single neurons inside a language model. A neuron reads a text one token at a time and "
    "gives each token an activation from 0 to 10: 0 means it is silent, 10 means it fires as strongly as it "
    "does anywhere in these texts. You will see a few texts, one token per line, each followed by a tab and "
    "its activation. Work out what the neuron responds to and describe it in one short sentence: the kind of "
    "token and the context, not a list of example words. Line breaks in a token are shown as ⏎, tabs as ⇥. "
    f'Answer with one line that completes "{LEAD_IN} ...".'
)


def format_explainer_records(records: list[tuple[list[str], list[int]]]) -> str:
    """Records as `token<TAB>value` lines between <text k> markers; if under 20% of the values are non-zero,
    the same texts follow again with the zero lines left out, so the sparse hits stand out."""
    def block(only_nonzero: bool) -> list[str]:
        lines = []
        for k, (tokens, values) in enumerate(records, start=1):
            lines.append(f"<text {k}>")
            lines += [f"{escape_token(t)}\t{v}" for t, v in zip(tokens, values, strict=True)
                      if v or not only_nonzero]
            lines.append(f"</text {k}>")
        return lines

    lines = ["Activations:"] + block(False)
    values = [v for _, vals in records for v in vals]
    if values and sum(1 for v in values if v) < SPARSE_FRACTION * len(values):
        lines += ["", "The same texts again, showing only the tokens with a non-zero activation:"] + block(True)
    return "\n".join(lines)


def _explainer_user(records: list[tuple[list[str], list[int]]]) -> str:
    return f"{format_explainer_records(records)}\n\nComplete the sentence: {LEAD_IN}"


def explainer_messages(records: list[tuple[list[str], list[int]]],
                       examples: tuple[Example, ...] = EXPLAINER_EXAMPLES) -> list[dict]:
    """Chat messages asking for an explanation of the records (tokens, normalized 0-10 values), after the
    worked `examples` as earlier turns (none: the instructions alone)."""
    messages = [{"role": "system", "content": EXPLAINER_SYSTEM}]
    for ex in examples:
        shown = [(ex.tokens(i), ex.values(i)) for i in range(len(ex.records))]
        messages.append({"role": "user", "content": _explainer_user(shown)})
        messages.append({"role": "assistant", "content": f"{LEAD_IN} {ex.explanation}."})
    messages.append({"role": "user", "content": _explainer_user(records)})
    return messages


_LEAD_IN_RE = re.compile(r"(?:the\s+)?main\s+thing\s+(?:this|the)\s+neuron\s+does\s+is\s+(?:to\s+)?find\b[\s:,]*",
                         re.IGNORECASE)
# what chat models put before (or instead of) an answer: "Sure!", "Here's my answer:", "Explanation:"
_CHATTER_RE = re.compile(
    r"^(?:(?:sure|certainly|of\s+course|okay|ok|absolutely|alright|no\s+problem)\b[^\w\"“]*"
    r"|here(?:'s|’s|\s+is|\s+are)\b[^:!\n]*[:!]\s*"
    r"|(?:so,?\s+)?(?:my\s+|the\s+)?(?:final\s+)?(?:answer|explanation|response)\s*(?:is)?\s*:\s*)",
    re.IGNORECASE)
_QUOTE_PAIRS = {'"': '"', "“": "”", "'": "'"}


def _strip_chatter(line: str) -> str:
    while (m := _CHATTER_RE.match(line)) and m.end() > 0:
        line = line[m.end():].lstrip()
    return line


def _strip_edges(text: str) -> str:
    """Whitespace, one trailing period (an ellipsis stays) and quotes around the whole text, until none is left;
    then a lone quote at either end (`years"` from `find "years".`)."""
    while True:
        before = text
        text = text.strip()
        if text.endswith(".") and not text.endswith(".."):
            text = text[:-1].rstrip()
        opening = text[:1]
        closing = _QUOTE_PAIRS.get(opening)
        if closing and len(text) >= 2 and text.endswith(closing) and opening not in text[1:-1] \
                and closing not in text[1:-1]:
            text = text[1:-1]
        if text == before:
            break
    for opening, closing in (('"', '"'), ("“", "”")):
        unbalanced = text.count(opening) % 2 if opening == closing else text.count(opening) != text.count(closing)
        if unbalanced and text[:1] == opening and closing not in text[1:]:
            text = text[1:].lstrip()
        elif unbalanced and text[-1:] == closing and opening not in text[:-1]:
            text = text[:-1].rstrip()
    return text


def _quotes_balance(text: str) -> bool:
    return text.count('"') % 2 == 0 and text.count("“") == text.count("”")


def _normal_form(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


_EXAMPLE_EXPLANATIONS = {_normal_form(ex.explanation): ex.explanation for ex in EXPLAINER_EXAMPLES}


class EchoedExampleError(MalformedAnswerError):
    """The answer copies a worked example's explanation: the explainer asks again without worked examples."""


def clean_explanation(answer: str) -> str:
    """The explanation in a model's answer.

    Takes the first line that holds the lead-in phrase (the text after it), else the first line that is more
    than chatter; drops chatter before it ("Sure! Here's my answer:"), surrounding whitespace and quotes, and
    one trailing period. Raises MalformedAnswerError (retried with another sample) when nothing with a letter
    is left, when a quote is left open, or when the answer repeats a worked example's explanation (small
    models echo the examples)."""
    lines = [ln.strip() for ln in answer.strip().splitlines() if ln.strip()]
    with_lead_in = [(ln, m) for ln in lines if (m := _LEAD_IN_RE.search(ln))]
    if with_lead_in:
        line, m = with_lead_in[0]
        line = line[m.end():]
    else:
        line = next((rest for ln in lines if (rest := _strip_chatter(ln))), "")
    line = _strip_edges(_strip_chatter(line))
    if not re.search(r"[^\W\d_]", line):  # no letter at all: empty, punctuation or numbers only
        raise MalformedAnswerError(f"no explanation in the answer {answer[:80]!r}")
    if not _quotes_balance(line):
        raise MalformedAnswerError(f"unbalanced quotes in the explanation {line[:80]!r}")
    # an echo may add a word or two ("... loop, or if statement"): the example's words in order count as one
    answer = f" {_normal_form(line)} "
    example = next((ex for norm, ex in _EXAMPLE_EXPLANATIONS.items() if f" {norm} " in answer), None)
    if example is not None:
        raise EchoedExampleError(f"the answer repeats a worked example's explanation ({example!r})")
    return line


# --- simulator (docs/method.md §5) ---------------------------------------------------------------------------------
_SIM_TASK = (
    "Each neuron below comes with an explanation of what it responds to, followed by a text split into "
    "tokens, one per line. After each token comes a tab and the neuron's activation on that token: an integer "
    "from 0 (silent) to 10 (its strongest). Most tokens get 0. Line breaks in a token are shown as ⏎, tabs as ⇥."
)
SIMULATOR_PROMPT_INTRO = (
    "We are predicting how neurons in a language model respond to text. " + _SIM_TASK + " Where the "
    f'activation is not known yet it reads "{PLACEHOLDER}"; predict it from the explanation.'
)


def _completion_example(n: int, ex: Example) -> str:
    lines = [f"Neuron {n}", f"Explanation: {LEAD_IN.lower()} {_sentence(ex.explanation)}", "Activations:"]
    for k in range(len(ex.records)):
        pairs = ex.records[k]
        hidden = len(pairs) // 3  # the first third is a placeholder: placeholders can be followed by numbers
        lines.append(f"<text {k + 1}>")
        lines += [f"{escape_token(t)}\t{PLACEHOLDER if i < hidden else v}" for i, (t, v) in enumerate(pairs)]
        lines.append(f"</text {k + 1}>")
    return "\n".join(lines)


SIMULATOR_PROMPT_PREFIX = "\n\n".join(
    [SIMULATOR_PROMPT_INTRO] + [_completion_example(n, ex) for n, ex in enumerate(SIMULATOR_EXAMPLES, start=1)]
) + "\n\n"


def simulator_completion_prompt(explanation: str, token_lists: list[list[str]]) -> tuple[str, list[int]]:
    """Prompt text for prompt-logprob simulation, and the character offset of every target token's
    placeholder (in record order). The text before each offset ends with the token and a tab, so the
    next-token distribution there is the model's prediction of that token's value."""
    n = len(SIMULATOR_EXAMPLES) + 1
    parts = [SIMULATOR_PROMPT_PREFIX,
             f"Neuron {n}\nExplanation: {LEAD_IN.lower()} {_sentence(explanation)}\nActivations:\n"]
    offsets: list[int] = []
    length = sum(len(p) for p in parts)
    for k, tokens in enumerate(token_lists, start=1):
        for piece in [f"<text {k}>\n"] + [f"{escape_token(t)}\t" for t in tokens]:
            parts.append(piece)
            length += len(piece)
            if piece.endswith("\t"):
                offsets.append(length)
                parts.append(f"{PLACEHOLDER}\n")
                length += len(PLACEHOLDER) + 1
        parts.append(f"</text {k}>\n")
        length += len(parts[-1])
    return "".join(parts), offsets


SIMULATOR_CHAT_SYSTEM = (
    "You predict how a neuron in a language model responds to text. " + _SIM_TASK + " You get the explanation "
    "and the tokens without activations. Write every token again on its own line, exactly as shown and in the "
    "same order, then a tab, then your predicted activation. Keep the <text k> marker lines. Every token gets "
    "a value, the last one too. Write nothing else."
)


def _chat_user(explanation: str, token_lists: list[list[str]]) -> str:
    lines = [f"Explanation: {LEAD_IN.lower()} {_sentence(explanation)}", ""]
    for k, tokens in enumerate(token_lists, start=1):
        lines += [f"<text {k}>"] + [escape_token(t) for t in tokens] + [f"</text {k}>"]
    return "\n".join(lines)


def _chat_answer(token_lists: list[list[str]], value_lists: list[list[int]]) -> str:
    lines = []
    for k, (tokens, values) in enumerate(zip(token_lists, value_lists, strict=True), start=1):
        lines += [f"<text {k}>"] + [f"{escape_token(t)}\t{v}" for t, v in zip(tokens, values, strict=True)]
        lines.append(f"</text {k}>")
    return "\n".join(lines)


def simulator_chat_messages(explanation: str, token_lists: list[list[str]]) -> list[dict]:
    """Chat messages for generated-logprob and logprob-free simulation."""
    messages = [{"role": "system", "content": SIMULATOR_CHAT_SYSTEM}]
    for ex in SIMULATOR_EXAMPLES:
        toks = [ex.tokens(i) for i in range(len(ex.records))]
        messages.append({"role": "user", "content": _chat_user(ex.explanation, toks)})
        messages.append({"role": "assistant",
                         "content": _chat_answer(toks, [ex.values(i) for i in range(len(ex.records))])})
    messages.append({"role": "user", "content": _chat_user(explanation, token_lists)})
    return messages


def simulator_max_tokens(token_lists: list[list[str]]) -> int:
    """Room for the echoed answer: a few tokens per line plus the markers."""
    return sum(6 * len(t) + 16 for t in token_lists) + 32


@dataclass
class ParsedValue:
    value: int
    offset: int  # character offset of the value in the answer text (to find its generated token)


_MARKER_RE = re.compile(r"</?text\s*\d+>")
_TAB_LINE_RE = re.compile(r"^(?P<tok>.*)\t[ \t]*(?P<val>\S+?)[ \t.,;]*$")
_SPACE_LINE_RE = re.compile(r"^(?P<tok>.*?)[ ]+(?P<val>\d+)[ \t]*$")


def parse_simulator_answer(text: str, token_lists: list[list[str]]) -> list[list[ParsedValue]]:
    """Align an echoed `token<TAB>value` answer with the records' tokens.

    Blank and marker lines are skipped, and so is chatter before the first token; lines after the last token
    are ignored. A token that does not match the expected one (compared without surrounding whitespace), a
    value that is not an integer 0-10, or an answer that stops early raises MalformedAnswerError."""
    expected = [(r, escape_token(t).strip()) for r, tokens in enumerate(token_lists) for t in tokens]
    out: list[list[ParsedValue]] = [[] for _ in token_lists]
    k, start = 0, 0
    for line in text.split("\n"):
        line_start, start = start, start + len(line) + 1
        body = line.rstrip("\r")
        if k == len(expected):
            break
        if not body.strip() or _MARKER_RE.fullmatch(body.strip()):
            continue
        record, want = expected[k]
        m = _TAB_LINE_RE.match(body)
        if m is None:
            m = _SPACE_LINE_RE.match(body)
            if m is not None and m["tok"].strip() != want:
                m = None
        if m is None:
            if k == 0:
                continue  # a preamble before the answer
            raise MalformedAnswerError(f"token {k + 1} of {len(expected)}: no value on line {body[:60]!r}")
        if m["tok"].strip() != want:
            raise MalformedAnswerError(
                f"misaligned at token {k + 1} of {len(expected)}: expected {want!r}, got {m['tok'].strip()!r}")
        value = numeric_value(m["val"])
        if value is None:
            raise MalformedAnswerError(f"token {k + 1} ({want!r}): value {m['val']!r} is not an integer 0-10")
        out[record].append(ParsedValue(value, line_start + m.start("val")))
        k += 1
    if k < len(expected):
        raise MalformedAnswerError(f"answer stops after {k} of {len(expected)} tokens (truncated?)")
    return out


# --- detection and fuzzing (docs/method.md §6, EleutherAI style) ----------------------------------------------------
HIGHLIGHT_OPEN, HIGHLIGHT_CLOSE = "<<", ">>"

DETECTION_SYSTEM = (
    "You check explanations of neurons in a language model. You get an explanation of what a neuron "
    "responds to and some numbered text snippets. For each snippet, decide from the explanation alone whether "
    "the neuron fires strongly somewhere in it (1) or not (0). Line breaks are shown as ⏎. Answer with a list "
    "of 0s and 1s, one per snippet and in order, such as [1, 0, 0, 1], and nothing else."
)
FUZZING_SYSTEM = (
    "You check explanations of neurons in a language model. You get an explanation of what a neuron "
    f"responds to and some numbered text snippets in which some tokens are marked {HIGHLIGHT_OPEN}like "
    f"this{HIGHLIGHT_CLOSE}. For each snippet, decide whether the marked tokens are the ones the explanation "
    "describes (1) or not (0). Line breaks are shown as ⏎. Answer with a list of 0s and 1s, one per snippet "
    "and in order, such as [1, 0, 0, 1], and nothing else."
)


def window_text(tokens: list[str], highlight: set[int] | frozenset[int] = frozenset()) -> str:
    """A window as one line of text; tokens at the given positions are wrapped in << >>."""
    parts = []
    for i, tok in enumerate(tokens):
        shown = tok.translate(_ESCAPE_TABLE)
        parts.append(f"{HIGHLIGHT_OPEN}{shown}{HIGHLIGHT_CLOSE}" if i in highlight else shown)
    return "".join(parts)


# One worked exchange per judge prompt, shown before the real question (made up for this project): an explanation,
# snippets and the right answer, half of them 1.
JUDGE_EXAMPLES: dict[str, tuple[str, list[str], list[int]]] = {
    DETECTION_SYSTEM: ("the word \"because\" and other words that give a reason",
                       ["He stayed home because it was raining.", "The train leaves at noon.",
                        "She smiled, since the news was good.", "Blue and green paint dries slowly."], [1, 0, 1, 0]),
    FUZZING_SYSTEM: ("names of months",
                     [f"We met in {HIGHLIGHT_OPEN}March{HIGHLIGHT_CLOSE} last year.",
                      f"{HIGHLIGHT_OPEN}The{HIGHLIGHT_CLOSE} report is due soon.",
                      f"Her birthday is in {HIGHLIGHT_OPEN}October{HIGHLIGHT_CLOSE}.",
                      f"He {HIGHLIGHT_OPEN}ran{HIGHLIGHT_CLOSE} to the store."], [1, 0, 1, 0]),
}


def _judge_question(explanation: str, snippets: list[str]) -> str:
    body = "\n".join(f"Snippet {i}: {s}" for i, s in enumerate(snippets, start=1))
    return f"Explanation: {LEAD_IN.lower()} {_sentence(explanation)}\n\n{body}\n\nAnswer with {len(snippets)} values."


def judge_messages(system: str, explanation: str, snippets: list[str]) -> list[dict]:
    """The system prompt, its worked example (`JUDGE_EXAMPLES`) as a user/assistant exchange, then the question."""
    messages = [{"role": "system", "content": system}]
    if system in JUDGE_EXAMPLES:
        ex_explanation, ex_snippets, ex_answer = JUDGE_EXAMPLES[system]
        messages += [{"role": "user", "content": _judge_question(ex_explanation, ex_snippets)},
                     {"role": "assistant", "content": "[" + ", ".join(map(str, ex_answer)) + "]"}]
    return messages + [{"role": "user", "content": _judge_question(explanation, snippets)}]


_LIST_RE = re.compile(r"\[([^\[\]]*)\]")
_BINARY_LIST_RE = re.compile(r"\s*[01](?:\s*,\s*[01])*\s*,?\s*")


def parse_binary_list(text: str, n: int) -> list[ParsedValue]:
    """The last `[1, 0, ...]` list of exactly n 0/1 entries in the answer; MalformedAnswerError otherwise."""
    for m in reversed(list(_LIST_RE.finditer(text))):
        inner = m.group(1)
        if _BINARY_LIST_RE.fullmatch(inner):
            values = [ParsedValue(int(d.group()), m.start(1) + d.start()) for d in re.finditer(r"[01]", inner)]
            if len(values) == n:
                return values
            raise MalformedAnswerError(f"answer lists {len(values)} values for {n} snippets")
    raise MalformedAnswerError(f"no list of 0s and 1s in the answer {text[:80]!r}")

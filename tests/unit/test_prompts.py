"""Prompt snapshots, token escaping, explanation cleanup and the answer parsers (docs/method.md §4-§6)."""
import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.failures import FailureReason
from workers.method.prompts import (
    EXPLAINER_EXAMPLES,
    EXPLAINER_SYSTEM,
    LEAD_IN,
    PLACEHOLDER,
    SIMULATOR_EXAMPLES,
    SIMULATOR_PROMPT_PREFIX,
    EchoedExampleError,
    MalformedAnswerError,
    clean_explanation,
    escape_token,
    explainer_messages,
    format_explainer_records,
    parse_binary_list,
    parse_simulator_answer,
    simulator_chat_messages,
    simulator_completion_prompt,
    unescape_token,
    window_text,
)

# --- escaping ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("token,shown", [
    ("\n", "⏎"), ("a\tb", "a⇥b"), ("\r\n", "␍⏎"), ("   ", "␣␣␣"), (" the", " the"), ("", "␀"), (" x ", " x "),
])
def test_escaping_keeps_one_token_on_one_line(token, shown):
    assert escape_token(token) == shown
    assert unescape_token(shown) == token


@given(st.text(alphabet=st.sampled_from(list("ab \n\t\r1)")), max_size=6))
def test_escaped_tokens_never_break_the_line_format(token):
    shown = escape_token(token)
    assert "\n" not in shown and "\t" not in shown and "\r" not in shown
    assert unescape_token(shown) == token


# --- explainer prompt ---------------------------------------------------------------------------------------
def test_explainer_records_snapshot():
    assert format_explainer_records([(["The", " 19", "\n", "87"], [0, 10, 0, 4])]) == (
        "Activations:\n<text 1>\nThe\t0\n 19\t10\n⏎\t0\n87\t4\n</text 1>")


def test_sparse_records_are_shown_again_without_the_zeros():
    # 1 non-zero token of 6 (17% < 20%): the hits are shown a second time on their own
    text = format_explainer_records([(["a", "b", "c"], [0, 7, 0]), (["d", "e", "f"], [0, 0, 0])])
    assert text == (
        "Activations:\n<text 1>\na\t0\nb\t7\nc\t0\n</text 1>\n<text 2>\nd\t0\ne\t0\nf\t0\n</text 2>\n\n"
        "The same texts again, showing only the tokens with a non-zero activation:\n"
        "<text 1>\nb\t7\n</text 1>\n<text 2>\n</text 2>")


def test_exactly_twenty_percent_non_zero_is_not_sparse():
    text = format_explainer_records([(["a", "b", "c", "d", "e"], [0, 3, 0, 0, 0])])
    assert "same texts again" not in text


def test_explainer_messages_snapshot():
    messages = explainer_messages([(["x", ")"], [0, 10])])
    assert messages[0] == {"role": "system", "content": EXPLAINER_SYSTEM}
    assert [m["role"] for m in messages] == ["system"] + ["user", "assistant"] * 3 + ["user"]
    assert messages[-1]["content"] == (
        "Activations:\n<text 1>\nx\t0\n)\t10\n</text 1>\n\nComplete the sentence: "
        "The main thing this neuron does is find")
    assert all(m["content"].startswith(LEAD_IN) for m in messages if m["role"] == "assistant")
    # the examples are this project's own, and one of them demonstrates the sparse re-show
    assert sum("same texts again" in m["content"] for m in messages[1:-1]) == 1


@pytest.mark.parametrize("answer,clean", [
    ("digits in years.", "digits in years"),
    ("  The main thing this neuron does is find closing parentheses.\n", "closing parentheses"),
    ("the main thing this neuron does is to find: commas", "commas"),
    ('"the word the."', "the word the"),
    ("words ending a list...", "words ending a list..."),
    ("\n\nnumbers\nand a second line", "numbers"),
    # chatter before the answer, on its own line or the same one
    ("Sure! Here's my answer:\nyears written in words.", "years written in words"),
    ("Sure! Here's my answer: years.", "years"),
    ("Certainly. The main thing this neuron does is find commas.", "commas"),
    ("I looked at the texts.\nThe main thing this neuron does is find closing parentheses.", "closing parentheses"),
    ("Explanation: the colon: in dictionaries", "the colon: in dictionaries"),
    ("Okay, so the answer is: dates", "dates"),
    # quotes: around the whole, or one left over after the period
    ('The main thing this neuron does is find "years".', "years"),
    ('The main thing this neuron does is find years".', "years"),
    ('"dates in a list', "dates in a list"),
    ("“commas", "commas"),
    ("“commas”.", "commas"),
    ('the word "the".', 'the word "the"'),
    ('"the" and "a"', '"the" and "a"'),
    ("it's a word", "it's a word"),
    ("yes/no questions", "yes/no questions"),
])
def test_clean_explanation(answer, clean):
    assert clean_explanation(answer) == clean


@pytest.mark.parametrize("answer,error", [
    ("Sure!", "no explanation in the answer"),
    ("Here's my answer:", "no explanation in the answer"),
    ('the word "the', "unbalanced quotes"),
    ("quotes “opened and never closed", "unbalanced quotes"),
])
def test_chatter_alone_or_an_open_quote_is_malformed(answer, error):
    with pytest.raises(MalformedAnswerError, match=error):
        clean_explanation(answer)


@pytest.mark.parametrize("ex", EXPLAINER_EXAMPLES, ids=lambda ex: ex.explanation[:20])
def test_an_answer_repeating_a_worked_example_is_malformed(ex):
    with pytest.raises(MalformedAnswerError, match="repeats a worked example") as e:
        clean_explanation(f"{LEAD_IN} {ex.explanation.upper()}.")
    assert e.value.retryable
    # a near echo with a word or two more (seen from SmolLM2-135M: "... function, loop, or if statement") too
    with pytest.raises(EchoedExampleError):
        clean_explanation(f"{LEAD_IN} {ex.explanation.replace(' ', ', ', 1)} statement, mostly.")
    # sharing most of its words is not an echo
    first, _, rest = ex.explanation.partition(" ")
    assert clean_explanation(f"{LEAD_IN} {rest}") == rest


@pytest.mark.parametrize("answer", ["", "   \n ", ".", "The main thing this neuron does is find.", "42"])
def test_empty_or_unusable_explanations_are_errors_not_placeholders(answer):
    with pytest.raises(MalformedAnswerError, match="no explanation in the answer") as e:
        clean_explanation(answer)
    assert e.value.reason == FailureReason.MALFORMED and e.value.retryable


# --- simulator prompts --------------------------------------------------------------------------------------
def test_completion_prompt_snapshot_and_offsets():
    prompt, offsets = simulator_completion_prompt("digits", [["a", "\n", " 1"], ["x)"]])
    assert prompt.startswith(SIMULATOR_PROMPT_PREFIX)  # shared by every neuron: a reusable cached prefix
    assert prompt[len(SIMULATOR_PROMPT_PREFIX):] == (
        "Neuron 3\nExplanation: the main thing this neuron does is find digits.\nActivations:\n"
        "<text 1>\na\tunknown\n⏎\tunknown\n 1\tunknown\n</text 1>\n<text 2>\nx)\tunknown\n</text 2>\n")
    assert len(offsets) == 4
    for offset, token in zip(offsets, ["a", "⏎", " 1", "x)"]):
        assert prompt[offset:].startswith(PLACEHOLDER + "\n")
        assert prompt[prompt.rfind("\n", 0, offset) + 1:offset] == token + "\t"


def test_completion_prefix_examples_show_placeholders_followed_by_values():
    example = SIMULATOR_PROMPT_PREFIX.split("Neuron 1\n")[1].split("</text 1>")[0]
    values = [line.split("\t")[1] for line in example.splitlines() if "\t" in line]
    first_number = next(i for i, v in enumerate(values) if v != PLACEHOLDER)
    assert first_number > 0 and all(v == PLACEHOLDER for v in values[:first_number])
    assert all(v.isdigit() for v in values[first_number:])


def test_chat_simulator_messages_snapshot():
    messages = simulator_chat_messages("closing parentheses", [["f", "(x", ")"], ["\t"]])
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert messages[-1]["content"] == (
        "Explanation: the main thing this neuron does is find closing parentheses.\n\n"
        "<text 1>\nf\n(x\n)\n</text 1>\n<text 2>\n⇥\n</text 2>")
    # the worked answers are themselves well-formed answers for their examples
    for ex, answer in zip(SIMULATOR_EXAMPLES, [messages[2]["content"], messages[4]["content"]]):
        tokens = [ex.tokens(i) for i in range(len(ex.records))]
        assert _values(parse_simulator_answer(answer, tokens)) == [ex.values(i) for i in range(len(ex.records))]


# --- parsing echoed answers (modes 2 and 3) ----------------------------------------------------------------
TOKENS = [["The", " 19", "87", "\n"], ["x", ")"]]


def _values(parsed):
    return [[p.value for p in rec] for rec in parsed]


def test_parse_aligned_answer_with_markers():
    answer = "<text 1>\nThe\t0\n 19\t3\n87\t10\n⏎\t0\n</text 1>\n<text 2>\nx\t0\n)\t9\n</text 2>"
    parsed = parse_simulator_answer(answer, TOKENS)
    assert _values(parsed) == [[0, 3, 10, 0], [0, 9]]
    assert all(answer[p.offset:].split("\n")[0] == str(p.value) for rec in parsed for p in rec)


def test_parse_tolerates_whitespace_preamble_blank_lines_and_trailing_text():
    answer = "Sure, here you go:\n\nThe\t0\n19 \t 3\n87\t10.\n⏎\t0\n\nx 0\n)\t9\nHope this helps!"
    assert _values(parse_simulator_answer(answer, TOKENS)) == [[0, 3, 10, 0], [0, 9]]


def test_truncated_answer_fails_instead_of_scoring_zeros():
    with pytest.raises(MalformedAnswerError, match="stops after 5 of 6"):
        parse_simulator_answer("The\t0\n 19\t3\n87\t10\n⏎\t0\nx\t0\n", TOKENS)


def test_missing_last_value_fails():
    with pytest.raises(MalformedAnswerError, match=r"token 6 of 6: no value on line '\)'"):
        parse_simulator_answer("The\t0\n 19\t3\n87\t10\n⏎\t0\nx\t0\n)", TOKENS)


def test_misaligned_token_fails():
    with pytest.raises(MalformedAnswerError, match="misaligned at token 3"):
        parse_simulator_answer("The\t0\n 19\t3\n88\t10\n⏎\t0\nx\t0\n)\t9", TOKENS)


def test_skipped_token_fails():
    with pytest.raises(MalformedAnswerError, match="misaligned at token 2 of 6: expected '19', got '87'"):
        parse_simulator_answer("The\t0\n87\t10\n⏎\t0\nx\t0\n)\t9", TOKENS)


@pytest.mark.parametrize("bad", ["11", "-1", "high", "3.5"])
def test_values_outside_0_to_10_fail(bad):
    with pytest.raises(MalformedAnswerError, match="not an integer 0-10"):
        parse_simulator_answer(f"The\t0\n 19\t{bad}\n87\t10\n⏎\t0\nx\t0\n)\t9", TOKENS)


# --- detection / fuzzing -----------------------------------------------------------------------------------
def test_window_text_highlights_and_escapes():
    assert window_text(["f", "(x", ")", "\n"], {2}) == "f(x<<)>>⏎"


def test_parse_binary_list():
    parsed = parse_binary_list("Answer: [1, 0,1 ,0]", 4)
    assert [p.value for p in parsed] == [1, 0, 1, 0]
    assert [("Answer: [1, 0,1 ,0]")[p.offset] for p in parsed] == ["1", "0", "1", "0"]


@pytest.mark.parametrize("answer, why", [("[1, 0, 1]", "answer lists 3 values for 4 snippets"),
                                         ("1 0 1 0", "no list of 0s and 1s"), ("[1, 2, 0, 0]", "no list of 0s and 1s"),
                                         ("", "no list of 0s and 1s")])
def test_parse_binary_list_rejects_wrong_answers(answer, why):
    with pytest.raises(MalformedAnswerError, match=why):
        parse_binary_list(answer, 4)


def test_an_empty_token_is_a_visible_line_that_round_trips():
    # the corpus gives "" to a token whose bytes are only the start of a character completed by the next token
    from workers.method.prompts import escape_token, parse_simulator_answer, unescape_token

    assert escape_token("") == "␀" and unescape_token("␀") == ""
    answer = "".join(f"{escape_token(t)}\t{v}\n" for t, v in [("caf", 1), ("", 0), ("é", 7)])
    parsed = parse_simulator_answer(answer, [["caf", "", "é"]])
    assert [p.value for p in parsed[0]] == [1, 0, 7]

"""Assistant-only masks with the stock chat templates people train with, against independent references.

Templates are read at test time from the installed trl package (trl/chat_templates/, never copied
here): the stock `<name>.jinja` and, where trl ships one, its `{% generation %}`-marked
`<name>_training.jinja`. Mistral is not in trl: tests/fixtures/mistral_v3_tekken.jinja is written
after mistral-common (Mistral's reference tokenization; `test_mistral_fixture_renders_as_mistral_common`
checks the text where mistral_common is installed).

Reference masks, never computed by llmtrain's code:
  marked  transformers' own `apply_chat_template(..., return_assistant_tokens_mask=True)` on the
          marked template, which renders the same text as the stock one (asserted), normalised by
          two documented conventions: trailing layout whitespace after the end-of-turn token is
          not trained, and the generation prompt is not trained (trl's gpt-oss, DeepSeek and
          Qwen2.5 training blocks open inside it: "<|start|>assistant", "<｜Assistant｜>", "\\n").
  header  where no marked version renders the same text (Llama 3.1/3.2, Qwen3 history turns,
          Mistral, DeepSeek without its reasoning): the family's documented layout applied to
          transformers' own render: from after the assistant header to the end-of-turn token.
Tokenizer: a copy of the project's byte-level BPE with the family's special tokens added and bos/eos
set as the family's, so <|eot_id|>, <think>, ... are single tokens as in the real tokenizers.
"""
from __future__ import annotations

import datetime
import functools
import json
import os
import re

import numpy as np
import pytest
from transformers import AutoTokenizer

from conftest import REPO, TOKENIZER
from llmtrain.data.chat import ChatOptions, RowError, to_messages, tokenize_chat
from llmtrain.data.labels import IGNORE_INDEX
from llmtrain.data.sft import encode_row

trl = pytest.importorskip("trl")
TRL_TEMPLATES = os.path.join(os.path.dirname(trl.__file__), "chat_templates")
MISTRAL_FIXTURE = os.path.join(REPO, "tests", "fixtures", "mistral_v3_tekken.jinja")

# family: (added tokens, bos, eos)
_FAMILIES = {
    "llama3": (["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>",
                "<|python_tag|>"], "<|begin_of_text|>", "<|eot_id|>"),
    "qwen": (["<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
              "<think>", "</think>"], None, "<|im_end|>"),
    "gemma": (["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>"], "<bos>", "<eos>"),
    "phi3": (["<s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], "<s>", "<|endoftext|>"),
    "deepseek": (["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<think>",
                  "</think>", "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>",
                  "<｜tool▁call▁end｜>", "<｜tool▁sep｜>", "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>",
                  "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"], "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    "gptoss": (["<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>", "<|call|>", "<|constrain|>"],
               None, "<|return|>"),
    "mistral": (["<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]",
                 "[TOOL_RESULTS]", "[/TOOL_RESULTS]"], "<s>", "</s>"),
}
_FAMILY_OF = {"llama3": "llama3", "llama3_1": "llama3", "llama3_2": "llama3", "qwen2_5": "qwen", "qwen3": "qwen",
              "gemma": "gemma", "gemma3": "gemma", "phi3": "phi3", "phi3_5": "phi3", "deepseek_r1_distill": "deepseek",
              "gptoss": "gptoss", "mistral": "mistral"}
# text of the generation prompt that trl's marked templates put inside their {% generation %} block
_PROMPT_IN_MARKED_BLOCK = {"qwen2_5": ["\n"], "gptoss": ["<|start|>assistant"],
                           "deepseek_r1_distill": ["<｜Assistant｜>", "<｜tool▁outputs▁end｜>"]}
# (assistant header regex, end-of-turn tokens) of each family's documented layout: the header reference
_LAYOUT = {
    "llama3": (r"<\|start_header_id\|>assistant<\|end_header_id\|>\n\n", ["<|eot_id|>", "<|eom_id|>"]),
    "qwen": (r"<\|im_start\|>assistant\n", ["<|im_end|>"]),
    "deepseek": (r"<｜Assistant｜>|<｜tool▁outputs▁end｜>", ["<｜end▁of▁sentence｜>"]),
    "mistral": (r"\[/INST\]|\[/TOOL_RESULTS\]", ["</s>"]),
}
_DATE = datetime.datetime(2024, 7, 26)  # ChatOptions' default template_date


def _template(name: str) -> str:
    path = MISTRAL_FIXTURE if name == "mistral" else os.path.join(TRL_TEMPLATES, f"{name}.jinja")
    with open(path) as f:
        return f.read()


@functools.lru_cache(maxsize=None)
def tok_for(name: str):
    """The project tokenizer + the family's special tokens, with template `name` (shared: never mutate)."""
    tokens, bos, eos = _FAMILIES[_FAMILY_OF[name.replace("_training", "")]]
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    tok.add_special_tokens({"additional_special_tokens": tokens})
    if bos:
        tok.bos_token = bos
    tok.eos_token = eos
    tok.chat_template = _template(name)
    return tok


@pytest.fixture(autouse=True)
def fixed_clock(monkeypatch):
    """transformers' strftime_now (used by the reference renders) reads this clock: the reference date."""
    import transformers.utils.chat_template_utils as ctu

    class Clock(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return _DATE

    monkeypatch.setattr(ctu, "datetime", Clock)


# --------------------------------------------------------------------------- conversations

S = {"role": "system", "content": "You are a terse math tutor.\nAnswer in one line."}
U1 = {"role": "user", "content": "What is 2 + 3?"}
A1 = {"role": "assistant", "content": "2 + 3 = 5."}
U2 = {"role": "user", "content": "And 10 + 7? Explain ✓ briefly."}
A2 = {"role": "assistant", "content": "10 + 7 = 17, since 7 more than 10 is 17."}
U3 = {"role": "user", "content": "Thanks!"}
A3 = {"role": "assistant", "content": "You're welcome."}
R1, R2 = "Add 2 and 3.\nThat gives 5.", "Ten plus seven: count up seven from ten."
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add two integers", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}]
CALL = {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 10, "b": 7}}}]}
RESULT = {"role": "tool", "content": '{"sum": 17}'}
FINAL = {"role": "assistant", "content": "The sum is 17."}


def reasoned(m: dict, reasoning: str) -> dict:
    return {**m, "reasoning_content": reasoning}


CONVS = {
    "single": [U1, A1],
    "system": [S, U1, A1],
    "multi": [S, U1, A1, U2, A2, U3, A3],
    "reasoning": [U1, reasoned(A1, R1), U2, reasoned(A2, R2)],
    "tools": [U2, CALL, RESULT, FINAL],
    "agent": [U2, reasoned(CALL, "I should call add."), RESULT, reasoned(FINAL, "The tool returned 17.")],
}


# --------------------------------------------------------------------------- references


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
    return list(zip(edges[::2], edges[1::2]))


def reference_marked(name: str, messages: list, tools=None, prompt_in_block=False) -> tuple[list, np.ndarray]:
    """transformers' assistant mask on trl's marked template, with the two conventions applied
    (`prompt_in_block`: keep the generation-prompt text that the marked block holds)."""
    tok = tok_for(f"{name}_training")
    out = tok.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    text = tok.apply_chat_template(messages, tools=tools, tokenize=False)
    offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    mask = np.array(out["assistant_masks"])
    for a, b in _runs(mask):
        for header in [] if prompt_in_block else _PROMPT_IN_MARKED_BLOCK.get(name, []):
            if text.startswith(header, offsets[a][0]):
                mask[a:b][[offsets[t][1] <= offsets[a][0] + len(header) for t in range(a, b)]] = 0
        t = b - 1
        while t >= a and not text[offsets[t][0]:offsets[t][1]].strip():  # trailing layout whitespace
            mask[t] = 0
            t -= 1
    return out["input_ids"], mask


def reference_layout(name: str, messages: list, tools=None, skip=()) -> tuple[list, np.ndarray]:
    """From after each assistant header to the end-of-turn token, on transformers' render of `name`;
    a span holding a string of `skip` starts after it (data.train_reasoning=false)."""
    tok = tok_for(name)
    header, ends = _LAYOUT[_FAMILY_OF[name]]
    text = tok.apply_chat_template(messages, tools=tools, tokenize=False)
    spans = []
    for m in re.finditer(header, text):
        stop = min(text.find(e, m.end()) + len(e) for e in ends if text.find(e, m.end()) >= 0)
        start = m.end()
        for s in skip:
            k = text.find(s, start, stop)
            start = k + len(s) if k >= 0 else start
        spans.append((start, stop))
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = np.array([int(any(a < e and b > s for s, e in spans)) for a, b in enc["offset_mapping"]])
    return enc["input_ids"], mask


def ours(name: str, messages: list, tools=None, **opts) -> tuple[list, np.ndarray]:
    ids, labels = tokenize_chat(tok_for(name), to_messages({"messages": messages}), tools=tools,
                                options=ChatOptions(**opts))
    return ids.tolist(), (labels != IGNORE_INDEX).astype(int)


def trained_texts(name: str, ids, mask) -> list[str]:
    return [tok_for(name).decode(ids[a:b]) for a, b in _runs(np.asarray(mask))]


def assert_same_mask(name, got, ref):
    (ids, mask), (ref_ids, ref_mask) = got, ref
    assert ids == list(ref_ids), "rendered text differs from the reference render"
    assert mask.tolist() == ref_mask.tolist(), (
        f"{name}: trained {trained_texts(name, ids, mask)} but the reference trains "
        f"{trained_texts(name, ids, ref_mask)}")


# --------------------------------------------------------------------------- stock vs marked version

_MARKED_CASES = [  # (template, conversation): the stock template renders what its marked version renders
    ("llama3", "single"), ("llama3", "system"), ("llama3", "multi"),
    ("qwen2_5", "single"), ("qwen2_5", "system"), ("qwen2_5", "multi"), ("qwen2_5", "tools"),
    ("qwen3", "single"), ("qwen3", "system"), ("qwen3", "agent"),
    ("gemma", "single"), ("gemma3", "single"), ("gemma3", "system"), ("gemma3", "multi"),
    ("phi3", "single"), ("phi3", "system"), ("phi3", "multi"), ("phi3_5", "system"), ("phi3_5", "multi"),
    ("deepseek_r1_distill", "single"), ("deepseek_r1_distill", "system"), ("deepseek_r1_distill", "multi"),
    ("gptoss", "single"), ("gptoss", "system"), ("gptoss", "multi"), ("gptoss", "reasoning"), ("gptoss", "tools"),
    ("gptoss", "agent"),
]


@pytest.mark.parametrize("name,conv", _MARKED_CASES)
def test_stock_template_mask_equals_its_marked_version(name, conv):
    messages = [m for m in CONVS[conv] if not (name == "gemma" and m["role"] == "system")]
    tools = TOOLS if conv in ("tools", "agent") else None
    assert_same_mask(name, ours(name, messages, tools), reference_marked(name, messages, tools))


@pytest.mark.parametrize("name,conv", [("qwen3", "agent"), ("gptoss", "reasoning"), ("phi3", "multi"),
                                       ("deepseek_r1_distill", "multi"), ("gemma3", "system"), ("qwen2_5", "tools")])
def test_marked_template_used_directly_gives_transformers_mask(name, conv):
    """model.chat_template = trl's *_training.jinja: llmtrain takes its {% generation %} spans as they are,
    generation-prompt text inside them included; only trailing layout whitespace is dropped."""
    tools = TOOLS if conv in ("tools", "agent") else None
    ids, labels = tokenize_chat(tok_for(f"{name}_training"), to_messages({"messages": CONVS[conv]}), tools=tools)
    ref_ids, ref_mask = reference_marked(name, CONVS[conv], tools, prompt_in_block=True)
    assert ids.tolist() == list(ref_ids)
    assert (labels != IGNORE_INDEX).astype(int).tolist() == ref_mask.tolist()


# --------------------------------------------------------------------------- history-rewriting templates


def test_qwen3_multi_turn_history_without_think_masks_every_answer():
    """Qwen3 drops <think> from turns before the last user query: a prefix render is no prefix of the
    full render (the old code raised a TemplateError that ended the run)."""
    got = ours("qwen3", CONVS["multi"])
    assert_same_mask("qwen3", got, reference_layout("qwen3", CONVS["multi"]))
    assert trained_texts("qwen3", *got) == ["2 + 3 = 5.<|im_end|>", A2["content"] + "<|im_end|>",
                                            "<think>\n\n</think>\n\nYou're welcome.<|im_end|>"]


def test_qwen3_reasoning_is_passed_and_trained_on_the_last_turn():
    got = ours("qwen3", CONVS["reasoning"])
    assert_same_mask("qwen3", got, reference_layout("qwen3", CONVS["reasoning"]))
    texts = trained_texts("qwen3", *got)
    assert texts[-1] == f"<think>\n{R2}\n</think>\n\n{A2['content']}<|im_end|>"  # not an empty think block
    # data.train_reasoning=false: the turn is trained from right after its reasoning text
    got = ours("qwen3", CONVS["reasoning"], train_reasoning=False)
    assert_same_mask("qwen3", got, reference_layout("qwen3", CONVS["reasoning"], skip=[R2]))


def test_qwen3_reasoning_content_reaches_the_template():
    """reasoning_content used to be dropped before rendering: Qwen3 then trained an empty think block."""
    got = ours("qwen3", [U1, reasoned(A1, R1)])
    assert trained_texts("qwen3", *got) == [f"<think>\n{R1}\n</think>\n\n{A1['content']}<|im_end|>"]
    assert_same_mask("qwen3", got, reference_marked("qwen3", [U1, reasoned(A1, R1)]))


def test_qwen3_inline_think_content_is_reasoning():
    messages = [U1, {"role": "assistant", "content": f"<think>\n{R1}\n</think>\n\n{A1['content']}"}]
    got = ours("qwen3", messages)
    assert_same_mask("qwen3", got, reference_marked("qwen3", messages))
    assert R1 in trained_texts("qwen3", *got)[0]


@pytest.mark.parametrize("name", ["llama3_1", "llama3_2"])
@pytest.mark.parametrize("conv", ["single", "system", "multi", "tools"])
def test_llama3x_masks_match_the_documented_layout(name, conv):
    tools = TOOLS if conv == "tools" else None
    assert_same_mask(name, ours(name, CONVS[conv], tools), reference_layout(name, CONVS[conv], tools))


def test_llama32_row_rendered_across_midnight_masks_with_one_date(monkeypatch):
    """Llama 3.2 prints strftime_now() in its header: a clock that moves a day per call (a row rendered
    across midnight) made the old prefix renders disagree. All renders of a row use one fixed date."""
    import transformers.utils.chat_template_utils as ctu

    class Midnight(datetime.datetime):
        calls = 0

        @classmethod
        def now(cls, tz=None):
            cls.calls += 1
            return _DATE + datetime.timedelta(days=cls.calls)

    monkeypatch.setattr(ctu, "datetime", Midnight)
    ids, labels = tokenize_chat(tok_for("llama3_2"), to_messages({"messages": CONVS["multi"]}))
    text = tok_for("llama3_2").decode(ids)
    assert "Today Date: 26 Jul 2024" in text and Midnight.calls == 0  # the real clock is never read
    ids2, labels2 = tokenize_chat(tok_for("llama3_2"), to_messages({"messages": CONVS["multi"]}),
                                  options=ChatOptions(template_date="2025-01-31"))
    assert "Today Date: 31 Jan 2025" in tok_for("llama3_2").decode(ids2)
    assert trained_texts("llama3_2", ids, labels != IGNORE_INDEX) == trained_texts(
        "llama3_2", ids2, labels2 != IGNORE_INDEX)


@pytest.mark.parametrize("conv", ["single", "system", "multi", "tools"])
def test_mistral_masks_match_the_documented_layout(conv):
    """Mistral puts the system prompt into the LAST user turn: prompts of earlier turns are no prefix
    of the full render (the old code failed on any multi-turn row with a system prompt)."""
    tools = TOOLS if conv == "tools" else None
    got = ours("mistral", CONVS[conv], tools)
    assert_same_mask("mistral", got, reference_layout("mistral", CONVS[conv], tools))
    if conv == "multi":
        assert tok_for("mistral").decode(got[0]).count("You are a terse math tutor.") == 1


def test_mistral_tool_turns_before_the_last_user_message_are_bad_rows():
    """mistral-common drops tool calls and results before the last user turn: the answer after them
    would be trained without its evidence, so the row is a counted bad row, not a silent loss."""
    messages = [U2, CALL, RESULT, FINAL, U3, A3]
    with pytest.raises(RowError, match="the chat template drops the tool message of turn 2"):
        ours("mistral", messages, TOOLS)


def test_deepseek_r1_prompt_ending_inside_the_answer():
    """The generation prompt ends with "<think>\\n", which the stock template's rendered answer lacks
    (it strips reasoning): the turn starts where the render leaves the prompt."""
    inline = [U1, {"role": "assistant", "content": f"<think>\n{R1}\n</think>\n\n{A1['content']}"}]
    with pytest.raises(RowError, match="drops the reasoning of the final assistant turn 1.*train_reasoning=false"):
        ours("deepseek_r1_distill", inline)
    got = ours("deepseek_r1_distill", inline, train_reasoning=False)
    assert_same_mask("deepseek_r1_distill", got, reference_layout("deepseek_r1_distill", inline))
    # trl's marked variant keeps the reasoning, and so trains it
    ids, labels = tokenize_chat(tok_for("deepseek_r1_distill_training"), to_messages({"messages": inline}))
    assert R1 in trained_texts("deepseek_r1_distill", ids.tolist(), labels != IGNORE_INDEX)[0]


def test_gemma_system_prompt_is_folded_into_the_first_user_turn():
    """Gemma 2 raises "System role not supported" (one such row used to end the run): the system prompt
    is folded into the first user turn as Gemma 3's template does; reference: the marked template on
    the conversation folded by hand."""
    folded = [{"role": "user", "content": f"{S['content']}\n\n{U1['content']}"}, A1, U2, A2]
    assert_same_mask("gemma", ours("gemma", [S, U1, A1, U2, A2]), reference_marked("gemma", folded))


def test_phi3_multi_turn_eos_only_after_the_last_turn():
    got = ours("phi3_5", CONVS["multi"])
    texts = trained_texts("phi3_5", *got)
    assert texts == ["2 + 3 = 5.<|end|>", A2["content"] + "<|end|>", "You're welcome.<|end|>\n<|endoftext|>"]


def test_gptoss_channels_history_ends_with_end_last_with_return():
    got = ours("gptoss", CONVS["reasoning"])
    texts = trained_texts("gptoss", *got)
    assert texts == ["<|channel|>final<|message|>2 + 3 = 5.<|end|>",
                     f"<|channel|>analysis<|message|>{R2}<|end|><|start|>assistant<|channel|>final<|message|>"
                     f"{A2['content']}<|return|>"]
    got = ours("gptoss", CONVS["reasoning"], train_reasoning=False)
    assert trained_texts("gptoss", *got)[-1].startswith("<|end|><|start|>assistant<|channel|>final")


# --------------------------------------------------------------------------- row forms


def test_reasoning_tool_calls_and_tool_turns_reach_the_template_in_every_row_form():
    """Reasoning under any of its three names, flat or nested tool calls with JSON-string arguments,
    ShareGPT observation/function_call turns and a JSON-string `tools` all give one conversation."""
    from llmtrain.data.chat import row_tools

    expected = ours("qwen3", CONVS["agent"], TOOLS)
    call = {"role": "assistant", "thinking": "I should call add.",
            "tool_calls": [{"name": "add", "arguments": json.dumps({"a": 10, "b": 7})}]}
    final = {"role": "assistant", "content": FINAL["content"], "reasoning": "The tool returned 17."}
    row = {"messages": [U2, call, RESULT, final], "tools": json.dumps(TOOLS)}
    got = tokenize_chat(tok_for("qwen3"), to_messages(row), tools=row_tools(row))
    assert got[0].tolist() == expected[0] and (got[1] != IGNORE_INDEX).astype(int).tolist() == expected[1].tolist()
    sharegpt = {"conversations": [{"from": "human", "value": U2["content"]},
                                  {"from": "function_call", "value": json.dumps({"name": "add", "arguments": {"a": 10, "b": 7}})},
                                  {"from": "observation", "value": RESULT["content"]},
                                  {"from": "gpt", "value": FINAL["content"]}]}
    assert [m["role"] for m in to_messages(sharegpt)] == ["user", "assistant", "tool", "assistant"]
    assert to_messages(sharegpt)[1]["tool_calls"] == [{"type": "function", "function": {"name": "add",
                                                                                       "arguments": {"a": 10, "b": 7}}}]


# --------------------------------------------------------------------------- rows that cannot be masked


@pytest.mark.parametrize("name,conv,reason", [
    ("llama3", "reasoning", "drops the reasoning of the final assistant turn 3"),
    ("llama3", "tools", "does not render tool call 'add' of assistant turn 1"),
    ("phi3", "tools", "chat template error: .dict object. has no attribute .content."),
    ("gemma", "tools", "chat template error: Conversation roles must alternate"),
    ("gemma3", "tools", "chat template error: Conversation roles must alternate"),
    ("deepseek_r1_distill", "tools", "chat template error: 'dict object' has no attribute 'content'"),
    ("qwen2_5", "reasoning", "drops the reasoning"),
])
def test_rows_a_template_cannot_hold_are_bad_rows_with_their_reason(name, conv, reason):
    tools = TOOLS if conv in ("tools", "agent") else None
    with pytest.raises(RowError, match=reason):
        ours(name, CONVS[conv], tools)


def test_llama31_drops_content_beside_a_tool_call_and_that_is_a_bad_row():
    call_with_text = {**CALL, "content": "Let me add these."}
    with pytest.raises(RowError, match="content of assistant turn 1 is not inside its trained span"):
        ours("llama3_1", [U2, call_with_text, RESULT, FINAL], TOOLS)


def test_multimodal_content_is_a_bad_row():
    row = {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
                        {"role": "assistant", "content": "A cat."}]}
    with pytest.raises(RowError, match="multimodal"):
        encode_row(tok_for("gemma3"), row, "auto", 512, "truncate")


_JUNK = [None, 3, "", " ", "<|im_end|>", "<think>", "</think>x", [{"type": "text", "text": "t"}], {"a": 1},
         "ok\n", "x" * 50]


@pytest.mark.parametrize("name", ["qwen3", "gemma", "llama3_2", "gptoss", "mistral", "deepseek_r1_distill", "phi3"])
def test_any_row_gives_ids_or_a_row_error_never_another_exception(name):
    """Random junk rows through encode_row: each is encoded or raises RowError (a counted bad row)."""
    rng = np.random.default_rng(0)
    roles = ["system", "user", "assistant", "tool", "ipython", "developer", "wizard"]
    outcomes = {"ok": 0, "bad": 0}
    for _ in range(120):
        messages = []
        for _ in range(int(rng.integers(1, 6))):
            m = {"role": roles[rng.integers(len(roles))], "content": _JUNK[rng.integers(len(_JUNK))]}
            if rng.random() < 0.2:
                m["tool_calls"] = [{"function": {"name": "f", "arguments": _JUNK[rng.integers(len(_JUNK))]}}]
            if rng.random() < 0.2:
                m["reasoning_content"] = _JUNK[rng.integers(len(_JUNK))]
            messages.append(m)
        try:
            out = encode_row(tok_for(name), {"messages": messages}, "auto", 256, "truncate")
            outcomes["ok" if out is not None else "bad"] += 1
        except RowError:
            outcomes["bad"] += 1
    assert outcomes["bad"] > 0


# --------------------------------------------------------------------------- DPO


@pytest.mark.parametrize("name,ref", [("qwen3", "layout"), ("mistral", "layout"), ("llama3_2", "layout"),
                                      ("gemma3", "marked")])
def test_dpo_labels_only_the_final_response_with_stock_templates(name, ref):
    from llmtrain.data.preference import encode_pair

    prompt = [S, U1, A1, U2]
    chosen, rejected = {"role": "assistant", "content": "17."}, {"role": "assistant", "content": "It is 18."}
    (c_ids, c_labels), (r_ids, r_labels) = encode_pair(tok_for(name), {"prompt": prompt, "chosen": [chosen],
                                                                      "rejected": [rejected]}, 512, 256)
    for ids, labels, answer in ((c_ids, c_labels, chosen), (r_ids, r_labels, rejected)):
        conv = prompt + [answer]
        ref_ids, ref_mask = reference_layout(name, conv) if ref == "layout" else reference_marked(name, conv)
        last = _runs(np.asarray(ref_mask))[-1]
        expected = np.zeros(len(ref_ids), int)
        expected[last[0]:last[1]] = 1
        assert ids.tolist() == list(ref_ids)
        assert (labels != IGNORE_INDEX).astype(int).tolist() == expected.tolist()
    n_prompt = int(np.flatnonzero(c_labels != IGNORE_INDEX)[0])
    assert c_ids[:n_prompt].tolist() == r_ids[:n_prompt].tolist()  # one prompt, two answers


# --------------------------------------------------------------------------- mask preview as data


def test_inspect_data_json_matches_the_reference_mask(tmp_path):
    """`launch/inspect_data.py --json`: one object per row of the first N rows, in file order, with
    trained[i] = 1 exactly where the reference mask trains token i (token 0 is never a target)."""
    from conftest import run_cmd, write_recipe

    tok_dir = tmp_path / "tok"
    tok = tok_for("qwen3")
    tok.save_pretrained(tok_dir)
    rows = [{"messages": CONVS["multi"]}, {"messages": CONVS["reasoning"]},
            {"messages": [U1, {"role": "assistant", "content": [{"type": "text", "text": "x"}]}]},
            {"messages": CONVS["agent"], "tools": TOOLS}]
    lines = [json.dumps(rows[0]), "{broken json", json.dumps(rows[1]), json.dumps(rows[2]), json.dumps(rows[3]),
             json.dumps(rows[0])]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(lines) + "\n")
    recipe = write_recipe(tmp_path / "r.yaml", {
        "output_dir": str(tmp_path / "run"),
        "model": {"tokenizer": str(tok_dir), "config": {"model_type": "llama", "hidden_size": 32,
                                                        "intermediate_size": 64, "num_hidden_layers": 1,
                                                        "num_attention_heads": 2, "num_key_value_heads": 1}},
        "data": {"train": [str(data)], "max_seq_len": 4096}})
    out = tmp_path / "masks.jsonl"
    proc = run_cmd(["python", "launch/inspect_data.py", "--recipe", recipe, "-n", "5", "--json", str(out)], timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["line"] for g in got] == [1, 2, 3, 4, 5]
    assert "bad JSON" in got[1]["bad"] and "multimodal" in got[3]["bad"]
    for g, conv, tools in ((got[0], CONVS["multi"], None), (got[2], CONVS["reasoning"], None),
                           (got[4], CONVS["agent"], TOOLS)):
        ref_ids, ref_mask = reference_layout("qwen3", conv, tools)
        ref_mask = ref_mask.copy()
        ref_mask[0] = 0
        assert g["input_ids"] == list(ref_ids) and g["trained"] == ref_mask.tolist()


def test_changing_train_reasoning_never_reuses_a_cached_preparation(tmp_path):
    """The tokenization cache is keyed by the mask options: flipping data.train_reasoning re-tokenizes."""
    from types import SimpleNamespace

    import torch

    from conftest import write_recipe
    from llmtrain.config import load_config
    from llmtrain.data.protocol import DataContext
    from llmtrain.objectives import SFT

    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps({"messages": CONVS["reasoning"]}) for _ in range(3)) + "\n")
    recipe = write_recipe(tmp_path / "r.yaml", {
        "output_dir": str(tmp_path / "run"), "model": {"tokenizer": TOKENIZER, "config": {"model_type": "llama"}},
        "data": {"train": [str(data)], "max_seq_len": 1024}})
    info = SimpleNamespace(world_size=1, rank=0, device=torch.device("cpu"))
    trained = []
    for flag in ("true", "false"):
        cfg = load_config(recipe, [f"data.train_reasoning={flag}"])
        data_ = SFT.from_config(cfg).build_data(DataContext.of(cfg, tok_for("qwen3"), info, "qwen3-test"))
        trained.append(int(data_.samples.seq_targets().sum()))
    assert trained[0] > trained[1]  # the reasoning tokens are trained only with train_reasoning=true
    assert len(os.listdir(tmp_path / "run" / "cache")) == 2


# --------------------------------------------------------------------------- labels and tokenization


def test_labels_from_spans_equal_a_per_token_overlap_test():
    """The vectorised labels (two char->token look-ups per span) against a plain loop over every token's
    offsets, on text with multi-byte characters split across byte-level tokens."""
    from llmtrain.data.chat_spans import _labels_by_offsets, labels_from_spans

    tok = tok_for("qwen3")
    rng = np.random.default_rng(1)
    pieces = ["héllo", " wörld", "✓", "日本語", "<|im_end|>", "\n", "  ", "🙂", "abc", "<think>"]
    for _ in range(30):
        text = "".join(pieces[i] for i in rng.integers(len(pieces), size=40))
        cuts = np.sort(rng.choice(np.arange(1, len(text)), size=6, replace=False))
        spans = [(int(cuts[k]), int(cuts[k + 1])) for k in range(0, 6, 2)]
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        expected = [i if any(a < e and max(b, a + 1) > s for s, e in spans) else IGNORE_INDEX
                    for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"])]
        ids, labels = labels_from_spans(tok, text, spans)
        assert ids.tolist() == enc["input_ids"]
        by_offsets = _labels_by_offsets(ids, np.asarray(enc["offset_mapping"]), spans)
        assert by_offsets.tolist() == expected
        # char->token look-ups agree with the overlap test except where a span edge cuts a character
        # that several byte tokens share (then the look-up takes the first of them)
        if all(text[s].isascii() and text[e - 1].isascii() for s, e in spans):
            assert labels.tolist() == expected


def test_worker_processes_encode_rows_as_the_main_process_does():
    """encode_row with a stock template runs in spawned worker processes (the parallel preparation)."""
    import multiprocessing as mp

    rows = [{"messages": CONVS[c]} for c in ("multi", "reasoning", "system")]
    tok = tok_for("qwen3")
    expected = [encode_row(tok, r, "auto", 1024, "truncate") for r in rows]
    with mp.get_context("spawn").Pool(1) as pool:
        got = pool.starmap(encode_row, [(tok, r, "auto", 1024, "truncate") for r in rows])
    for (ids, labels), (ids2, labels2) in zip(expected, got):
        assert ids.tolist() == ids2.tolist() and labels.tolist() == labels2.tolist()


def test_mistral_fixture_renders_as_mistral_common():
    """The Mistral fixture renders the text of mistral-common (Mistral's reference tokenizer, v3 tekken)."""
    mc = pytest.importorskip("mistral_common")
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, ToolMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    path = os.path.join(os.path.dirname(mc.__file__), "data", "tekken_240718.json")
    mt = MistralTokenizer.from_file(path, mode=ValidationMode.finetuning)

    def theirs(messages, tools=None):
        return mt.encode_chat_completion(ChatCompletionRequest(messages=messages, tools=tools)).text

    call = {"role": "assistant", "tool_calls": [{"id": "abcdefghi", "type": "function",
                                                 "function": {"name": "add", "arguments": {"a": 10, "b": 7}}}]}
    result = {"role": "tool", "content": "sum is 17", "tool_call_id": "abcdefghi"}
    ours_multi = tok_for("mistral").apply_chat_template(CONVS["multi"], tokenize=False)
    assert ours_multi == theirs([SystemMessage(content=S["content"]), UserMessage(content=U1["content"]),
                                 AssistantMessage(content=A1["content"]), UserMessage(content=U2["content"]),
                                 AssistantMessage(content=A2["content"]), UserMessage(content=U3["content"]),
                                 AssistantMessage(content=A3["content"])])
    tool = Tool(function=Function(**TOOLS[0]["function"]))
    ours_tools = tok_for("mistral").apply_chat_template([U1, A1, U2, call, result, FINAL], tools=TOOLS, tokenize=False)
    assert ours_tools == theirs([UserMessage(content=U1["content"]), AssistantMessage(content=A1["content"]),
                                 UserMessage(content=U2["content"]),
                                 AssistantMessage(tool_calls=[ToolCall(id="abcdefghi", function=FunctionCall(
                                     name="add", arguments='{"a": 10, "b": 7}'))]),
                                 ToolMessage(content="sum is 17", tool_call_id="abcdefghi"),
                                 AssistantMessage(content=FINAL["content"])], [tool])

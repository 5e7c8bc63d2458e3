"""Chat-template masking: which tokens of a rendered conversation are the assistant's, and so trained.

A conversation (``{"messages": [...]}``, ShareGPT's ``{"conversations": [{"from", "value"}, ...]}`` or
``{"prompt", "response"}``, as a JSONL line or a decoded parquet / `datasets` row: :func:`parse_messages`) is
rendered once with the tokenizer's own chat template, and the loss mask is 1 exactly on each
assistant message's rendered text (its answer, a <think> block where the template renders one, and
its end-of-turn token) as it stands in that render, which also holds for templates that render a
turn differently by its position (Qwen3's). The turn markers come from probe renders
(:class:`TurnMarkers`), or from the template's own ``{% generation %}`` blocks where it has them.
docs/data.md ("What is trained") gives the rules.
"""

import json
import re

import numpy as np

ROLES = ("system", "user", "assistant", "tool")
# The keys that make each record form (all of them, non-null).
RECORD_FORMS = {"messages": ("messages",), "conversations": ("conversations",), "prompt/response": ("prompt", "response")}
# ShareGPT's speakers (FastChat's human/gpt, and the role names some exports use instead).
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")
PROBE_QUESTION, PROBE_ANSWER = "PSFT-PROBE-QUESTION-7f3a", "PSFT-PROBE-ANSWER-c41e"


class MalformedSample(ValueError):
    """An input record (line or row) that cannot become a training sample; the message says why."""


class UnsupportedTemplate(ValueError):
    """A chat template whose assistant turns cannot be located; the message says why."""


def parse_messages(record) -> list[dict]:
    """A conversation's checked messages from one record: a JSONL line (str) or a row already decoded
    (dict: a parquet or `datasets` row), in ``messages``, ShareGPT ``conversations`` or prompt/response
    form (:func:`record_messages`)."""
    if isinstance(record, str):
        try:
            record = json.loads(record)
        except json.JSONDecodeError as e:
            raise MalformedSample(f"bad JSON: {e}") from None
    if not isinstance(record, dict):
        raise MalformedSample(f"expected a JSON object, got {type(record).__name__}")
    parsed = [checked_message(i, message) for i, message in enumerate(record_messages(record))]
    if not any(message["role"] == "assistant" for message in parsed):
        raise MalformedSample("no assistant turn")
    return parsed


def record_messages(record: dict) -> list:
    """The record's messages, unchecked, by the one form its keys show. A null field counts as absent:
    parquet and `datasets` give every row every column, null where the row has none."""
    fields = {key: value for key, value in record.items() if value is not None}
    forms = [form for form, keys in RECORD_FORMS.items() if all(key in fields for key in keys)]
    if not forms:
        raise MalformedSample('expected a "messages" list, a ShareGPT "conversations" list, or "prompt" and '
                              '"response" fields')
    if len(forms) > 1:
        raise MalformedSample(f"has fields of more than one form ({' and '.join(forms)}); expected one")
    if forms[0] == "prompt/response":
        messages = [{"role": "user", "content": fields["prompt"]}, {"role": "assistant", "content": fields["response"]}]
        if "system" in fields:
            messages.insert(0, {"role": "system", "content": fields["system"]})
        return messages
    turns = fields[forms[0]]
    if not isinstance(turns, list) or not turns:
        raise MalformedSample(f'"{forms[0]}" must be a non-empty list')
    return sharegpt_messages(turns) if forms[0] == "conversations" else turns


def sharegpt_messages(turns: list) -> list[dict]:
    """ShareGPT turns ``{"from", "value"}`` as messages, roles mapped as ShareGPT's readers do."""
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise MalformedSample(f'conversations[{i}]: needs a "from" and a "value"')
        role = SHAREGPT_ROLES.get(turn["from"])
        if role is None:
            raise MalformedSample(f"conversations[{i}]: unknown ShareGPT role {turn['from']!r} "
                                  f"(expected one of {', '.join(SHAREGPT_ROLES)})")
        messages.append({"role": role, "content": turn["value"]})
    return messages


def checked_message(i: int, message) -> dict:
    """Message `i` with only the fields the chat template is given, or MalformedSample saying what is wrong."""
    if not isinstance(message, dict) or "role" not in message or "content" not in message:
        raise MalformedSample(f"message {i}: needs a \"role\" and a \"content\"")
    role = message["role"]
    if role not in ROLES:
        raise MalformedSample(f"message {i}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
    tool_calls = message.get("tool_calls") if role == "assistant" else None
    if tool_calls is not None and (not isinstance(tool_calls, list)
                                   or not all(isinstance(call, dict) for call in tool_calls)):
        raise MalformedSample(f"message {i} (assistant): \"tool_calls\" must be a list of objects")
    content = message["content"]
    if content is None and tool_calls:
        content = ""
    if not isinstance(content, str) or not (content.strip() or tool_calls):
        raise MalformedSample(f"message {i} ({role}): empty or non-string content")
    out = {"role": role, "content": content}
    if role == "assistant":
        reasoning = message.get("reasoning_content")
        if reasoning is not None and not isinstance(reasoning, str):
            raise MalformedSample(f"message {i} (assistant): \"reasoning_content\" must be a string")
        if reasoning is not None:
            out["reasoning_content"] = reasoning
        if tool_calls:
            out["tool_calls"] = tool_calls
    return out


def render(tokenizer, messages, add_generation_prompt=False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja errors from a template that rejects this conversation
        raise MalformedSample(f"chat template failed: {type(e).__name__}: {e}") from None


def special_token_strings(tokenizer) -> list[str]:
    strings = set(tokenizer.all_special_tokens)
    strings.update(token.content for token in getattr(tokenizer, "added_tokens_decoder", {}).values()
                   if getattr(token, "special", False))
    return sorted((s for s in strings if s), key=len, reverse=True)


class TurnMarkers:
    """What the chat template writes around an assistant message, read once from probe renders.

    ``generation_prompt``: what ``add_generation_prompt`` appends (``<|im_start|>assistant\\n`` for
    Qwen); the model's output starts after it. ``header``: what precedes an assistant message's text
    in the history (the generation prompt itself for Qwen3; a prefix of it for templates whose
    generation prompt also opens a think block). ``end_of_turn``: the text from the end of the
    answer through the first special token after it (``<|im_end|>``): the model must learn to stop;
    what follows (the newline) is formatting.
    """

    def __init__(self, tokenizer):
        user = {"role": "user", "content": PROBE_QUESTION}
        answer = {"role": "assistant", "content": PROBE_ANSWER}
        try:
            base = render(tokenizer, [user])
            prompt = render(tokenizer, [user], add_generation_prompt=True)
            last = render(tokenizer, [user, answer])
        except MalformedSample as e:
            raise UnsupportedTemplate(f"the chat template cannot render a (user, assistant) probe conversation: {e}") from None
        if not prompt.startswith(base) or prompt == base:
            raise UnsupportedTemplate(
                "the chat template's add_generation_prompt does not append a generation prompt to the conversation, "
                "so where an assistant turn starts cannot be told")
        self.generation_prompt = prompt[len(base):]
        if not last.startswith(base) or PROBE_ANSWER not in last[len(base):]:
            raise UnsupportedTemplate("the chat template does not render an assistant message after the conversation "
                                      "before it")
        trailer = last[last.rindex(PROBE_ANSWER) + len(PROBE_ANSWER):]
        found = [(trailer.find(s), s) for s in special_token_strings(tokenizer) if s in trailer]
        if not found:
            raise UnsupportedTemplate(
                f"the chat template ends an assistant turn with {trailer!r}, which holds no special token, so the "
                "end of a turn (what the model must learn to stop at) cannot be told")
        position, token = min(found, key=lambda hit: (hit[0], -len(hit[1])))
        self.end_of_turn = trailer[:position + len(token)]
        # The header of an assistant turn that is not the last one (in Qwen3-Thinking-2507 and
        # DeepSeek-R1 the generation prompt also opens <think>, which earlier turns do not have).
        self.header = self.generation_prompt
        try:
            middle = render(tokenizer, [user, answer, {"role": "user", "content": PROBE_QUESTION}])
        except MalformedSample:
            middle = None
        if middle and middle.startswith(base) and PROBE_ANSWER in middle[len(base):]:
            header = middle[len(base):middle.index(PROBE_ANSWER, len(base))]
            if header and self.generation_prompt.startswith(header):
                self.header = header

    def as_dict(self):
        return {"method": "generation_prompt", "generation_prompt": self.generation_prompt, "header": self.header,
                "end_of_turn": self.end_of_turn}


def visible_answer(message) -> str:
    """The part of an assistant message's content every template keeps: what follows a think block."""
    return message["content"].split("</think>")[-1].strip()


def assistant_spans(text: str, messages: list[dict], markers: TurnMarkers) -> list[tuple[int, int]]:
    """Character range [start, end) of each assistant message's rendered text in the full render.

    Messages are walked in order with a cursor: a user/system/tool message moves it past its content;
    an assistant message's text starts after the first header at or after the cursor (after the whole
    generation prompt when it is rendered there) and ends with the first end-of-turn marker after that.
    Each span must hold the message's answer and no other turn's header, else the line is malformed.
    """
    spans, cursor = [], 0
    header, prompt, end_of_turn = markers.header, markers.generation_prompt, markers.end_of_turn
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            for needle in (message["content"], message["content"].strip()):
                found = text.find(needle, cursor) if needle else -1
                if found >= 0:
                    cursor = found + len(needle)
                    break
            continue
        for field in ("content", "reasoning_content"):
            if end_of_turn.strip() in message.get(field, ""):
                raise MalformedSample(f"message {k} (assistant): its {field} contains the end-of-turn marker "
                                      f"{end_of_turn.strip()!r}")
        at = text.find(header, cursor)
        if at < 0:
            raise MalformedSample(
                f"message {k} (assistant): the chat template renders it without the assistant header {header!r} "
                "that its generation prompt uses, so its rendered text cannot be located (unsupported template)")
        start = at + (len(prompt) if text.startswith(prompt, at) else len(header))
        end = text.find(end_of_turn, start)
        if end < 0:
            raise MalformedSample(f"message {k} (assistant): no end-of-turn marker {end_of_turn!r} after its header "
                                  "in the rendered conversation (unsupported template)")
        end += len(end_of_turn)
        answer = visible_answer(message)
        if header in text[start:end] or (answer and answer not in text[start:end]):
            raise MalformedSample(
                f"message {k} (assistant): its answer is not where the chat template renders that turn "
                f"(between {header!r} and {end_of_turn!r}); the template drops or moves it, or another message "
                "contains that header (unsupported template)")
        spans.append((start, end))
        cursor = end
    return spans


def encode_spans(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of `text` and a mask that is 1 on the tokens of the character ranges `spans`.

    The text is tokenized whole and each token assigned by its character offsets. Where a token
    straddles a span's edge (BPE merging header and answer, e.g. an answer that starts with a newline
    after ``assistant\\n``), the text is instead tokenized piece by piece at the span edges, as the
    model sees it at inference (the prompt ends at the header, the answer is generated after it),
    provided that decodes to the same text.
    """
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=bool(tokenizer.is_fast))
    ids = np.asarray(encoding["input_ids"], dtype=np.int64)
    if tokenizer.is_fast:
        offsets = np.asarray(encoding["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        starts, ends = offsets[:, 0], offsets[:, 1]
        mask = np.zeros(len(ids), dtype=np.uint8)
        straddles = False
        for start, end in spans:
            mask[(starts >= start) & (ends <= end) & (starts < end)] = 1
            straddles |= bool(np.any((starts < start) & (ends > start)) or np.any((starts < end) & (ends > end)))
        if not straddles:
            return ids, mask

    edges = sorted({0, len(text), *(edge for span in spans for edge in span)})
    pieces = [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]
    trained = set(spans)
    piece_ids = tokenizer([text[a:b] for a, b in pieces], add_special_tokens=False)["input_ids"]
    split_ids = np.asarray([i for chunk in piece_ids for i in chunk], dtype=np.int64)
    split_mask = np.concatenate([np.full(len(chunk), (a, b) in trained, dtype=np.uint8)
                                 for (a, b), chunk in zip(pieces, piece_ids)])
    if tokenizer.decode(split_ids.tolist()) != tokenizer.decode(ids.tolist()):
        raise MalformedSample("a token spans the edge of an assistant turn and the tokenizer does not reproduce "
                              "the text when the turn is tokenized on its own, so the mask cannot be exact")
    return split_ids, split_mask


def uses_generation_blocks(tokenizer) -> bool:
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default", "")
    return bool(template) and bool(GENERATION_BLOCK.search(template))


def tokenize_with_assistant_mask(tokenizer, messages: list[dict], markers: TurnMarkers = None
                                 ) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of the rendered conversation, and a mask that is 1 exactly on each assistant
    message's rendered text: its answer, the <think> block where the template renders one, and its
    end-of-turn token; 0 on system, user and tool turns, role headers and the newline after the turn.

    The conversation is rendered once, in full, so templates that render a turn by its position
    (Qwen3: a think block on the current answer only, earlier reasoning dropped) are masked as they
    render. A template with ``{% generation %}`` blocks marks the trained text itself; otherwise the
    spans come from :func:`assistant_spans` with ``markers`` (computed from the template when None).
    """
    if uses_generation_blocks(tokenizer):
        try:
            encoding = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                     return_assistant_tokens_mask=True)
        except Exception as e:
            raise MalformedSample(f"chat template failed: {type(e).__name__}: {e}") from None
        ids, mask = encoding["input_ids"], encoding["assistant_masks"]
        if ids and isinstance(ids[0], list):
            ids, mask = ids[0], mask[0]
        ids, mask = np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.uint8)
    else:
        if markers is None:
            try:
                markers = TurnMarkers(tokenizer)
            except UnsupportedTemplate as e:
                raise MalformedSample(str(e)) from None
        text = render(tokenizer, messages)
        ids, mask = encode_spans(tokenizer, text, assistant_spans(text, messages, markers))
    mask[:1] = 0  # the first token is never a label
    return ids, mask


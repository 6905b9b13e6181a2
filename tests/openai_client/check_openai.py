"""Talks to a running `forgeline serve` with the official `openai` client.

Usage: check_openai.py BASE_URL API_KEY MODEL
Prints one line per check; exits non-zero (with the reason) at the first failure.
"""

import json
import sys

import openai


def check(name, cond, detail=""):
    if not cond:
        sys.exit(f"FAIL {name}: {detail}")
    print(f"ok {name}")


def main():
    base_url, api_key, model = sys.argv[1:4]
    client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=120)

    ids = [m.id for m in client.models.list()]
    check("models.list", model in ids, ids)

    msgs = [{"role": "user", "content": "Name one Python keyword."}]
    r = client.chat.completions.create(model=model, messages=msgs, max_tokens=8, temperature=0)
    text = r.choices[0].message.content
    check("chat", isinstance(text, str) and text, r)
    check("chat usage", r.usage.completion_tokens >= 1 and r.usage.prompt_tokens > 0, r.usage)
    check("chat finish_reason", r.choices[0].finish_reason in ("stop", "length"), r)

    stream = client.chat.completions.create(
        model=model, messages=msgs, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage = [], None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        if chunk.usage is not None:
            usage = chunk.usage
    check("chat stream text", "".join(pieces) == text, ("".join(pieces), text))
    check("chat stream usage", usage is not None and usage.completion_tokens == r.usage.completion_tokens, usage)

    c = client.completions.create(model=model, prompt="def square(x):\n", max_tokens=12, temperature=0, stop=["\n\n"])
    check("completions", isinstance(c.choices[0].text, str) and c.usage.total_tokens > 0, c)
    pieces = [p.choices[0].text for p in client.completions.create(
        model=model, prompt="def square(x):\n", max_tokens=12, temperature=0, stop=["\n\n"], stream=True)
        if p.choices]
    check("completions stream", "".join(pieces) == c.choices[0].text, (pieces, c.choices[0].text))

    schema = {
        "type": "object",
        "properties": {
            "language": {"type": "string", "enum": ["python", "rust"]},
            "keywords": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1, "maxItems": 3},
        },
        "required": ["language", "keywords"],
        "additionalProperties": False,
    }
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "List Python keywords as JSON."}],
        max_tokens=64, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "kw", "schema": schema, "strict": True}},
    )
    raw = r.choices[0].message.content
    try:
        v = json.loads(raw)
    except ValueError as e:
        sys.exit(f"FAIL json_schema: not JSON ({e}): {raw!r}")
    valid = (
        set(v) == {"language", "keywords"}
        and v["language"] in ("python", "rust")
        and isinstance(v["keywords"], list)
        and 1 <= len(v["keywords"]) <= 3
        and all(isinstance(k, str) and len(k) <= 12 for k in v["keywords"])
    )
    check("json_schema", valid, raw)

    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "A JSON object about Python."}],
        max_tokens=48, temperature=0, response_format={"type": "json_object"},
    )
    if r.choices[0].finish_reason == "stop":
        check("json_object", isinstance(json.loads(r.choices[0].message.content), dict), r)

    # n choices: at temperature 0 with seeds, each equals a request of its own.
    many = client.chat.completions.create(
        model=model, messages=msgs, max_tokens=8, temperature=0, seed=5, n=4)
    alone = [
        client.chat.completions.create(
            model=model, messages=msgs, max_tokens=8, temperature=0, seed=5 + i
        ).choices[0].message.content
        for i in range(4)
    ]
    check(
        "n choices",
        [c.index for c in many.choices] == [0, 1, 2, 3]
        and [c.message.content for c in many.choices] == alone,
        many,
    )

    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Is water wet?"}], max_tokens=4,
        temperature=0, extra_body={"grammar": 'start: "yes" | "no"'},
    )
    check("grammar", r.choices[0].message.content in ("yes", "no"), r)

    check_logprobs(client, model, msgs)
    check_tools(client, model)

    # Fill in the middle needs FIM tokens, which the default model lacks: a 400 naming it.
    try:
        client.completions.create(model=model, prompt="def add(a, b):\n    ", suffix="\n", max_tokens=4)
        sys.exit("FAIL suffix: no error")
    except openai.BadRequestError as e:
        check("suffix without FIM tokens is 400", e.body and e.body.get("param") == "suffix"
              and model in e.body.get("message", ""), e.body)

    try:
        client.chat.completions.create(model="no-such-model", messages=msgs, max_tokens=2)
        sys.exit("FAIL unknown model: no error")
    except openai.NotFoundError as e:
        check("unknown model is 404", e.body and e.body.get("param") == "model", e.body)
    try:
        client.chat.completions.create(model=model, messages=msgs, max_tokens=2, temperature=5)
        sys.exit("FAIL bad temperature: no error")
    except openai.BadRequestError as e:
        check("bad temperature is 400", "temperature" in str(e), e)
    try:
        openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0).models.list()
        sys.exit("FAIL wrong key: no error")
    except openai.AuthenticationError:
        check("wrong key is 401", True)


def check_logprobs(client, model, msgs):
    r = client.chat.completions.create(
        model=model, messages=msgs, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
    text, lps = r.choices[0].message.content, r.choices[0].logprobs.content
    check(
        "chat logprobs",
        len(lps) == r.usage.completion_tokens
        and all(t.logprob <= 0 and len(t.top_logprobs) == 3 for t in lps)
        # Greedy: each token is its step's most likely; the alternatives are in order.
        and all(t.top_logprobs[0].token == t.token for t in lps)
        and all(a.logprob >= b.logprob for t in lps for a, b in zip(t.top_logprobs, t.top_logprobs[1:]))
        and "".join(t.token for t in lps).startswith(text)
        and all(bytes(t.bytes).decode("utf-8", "replace") == t.token for t in lps),
        r,
    )
    streamed = []
    for chunk in client.chat.completions.create(
            model=model, messages=msgs, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3,
            stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed.extend(chunk.choices[0].logprobs.content)
    check(
        "chat stream logprobs",
        [t.token for t in streamed] == [t.token for t in lps]
        and all(abs(a.logprob - b.logprob) < 1e-3 for a, b in zip(streamed, lps)),
        (streamed, lps),
    )
    c = client.completions.create(model=model, prompt="def square(x):\n", max_tokens=6, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    check(
        "completions logprobs",
        len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == c.usage.completion_tokens
        and all(len(top) <= 2 and max(top.values()) >= x - 1e-6 for top, x in zip(lp.top_logprobs, lp.token_logprobs))
        and lp.text_offset == sorted(lp.text_offset),
        lp,
    )


WEATHER = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 24}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}]


def streamed_calls(stream):
    """The calls and finish reason of a streamed answer, assembled as clients do."""
    calls, finish, content = {}, None, ""
    for chunk in stream:
        if not chunk.choices:
            continue
        ch = chunk.choices[0]
        content += ch.delta.content or ""
        for tc in ch.delta.tool_calls or []:
            c = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            c["id"] = tc.id or c["id"]
            c["name"] += tc.function.name or ""
            c["arguments"] += tc.function.arguments or ""
        finish = ch.finish_reason or finish
    return [calls[k] for k in sorted(calls)], finish, content


def check_tools(client, model):
    q = [{"role": "user", "content": "What is the weather in Paris?"}]
    kw = dict(model=model, tools=WEATHER, tool_choice="required", parallel_tool_calls=False,
              max_tokens=64, temperature=0)
    r = client.chat.completions.create(messages=q, **kw)
    calls = r.choices[0].message.tool_calls or []
    args = json.loads(calls[0].function.arguments) if calls else None
    check(
        "tool call",
        r.choices[0].finish_reason == "tool_calls" and len(calls) == 1
        and calls[0].function.name == "get_weather" and calls[0].id and calls[0].type == "function"
        and set(args) == {"city"} and isinstance(args["city"], str),
        r,
    )
    s_calls, s_finish, _ = streamed_calls(client.chat.completions.create(messages=q, stream=True, **kw))
    check(
        "tool call stream",
        s_finish == "tool_calls" and len(s_calls) == 1 and s_calls[0]["name"] == "get_weather"
        and json.loads(s_calls[0]["arguments"]) == args,
        (s_calls, s_finish),
    )
    # The round trip: the call and its result go back; the model answers in text.
    q2 = q + [
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": calls[0].id, "type": "function",
            "function": {"name": "get_weather", "arguments": calls[0].function.arguments}}]},
        {"role": "tool", "tool_call_id": calls[0].id, "content": "18 C and sunny"},
    ]
    final = client.chat.completions.create(
        model=model, messages=q2, tools=WEATHER, tool_choice="none", max_tokens=24, temperature=0)
    m = final.choices[0].message
    check("tool round trip", isinstance(m.content, str) and m.content and not m.tool_calls, final)
    _, f_finish, f_content = streamed_calls(client.chat.completions.create(
        model=model, messages=q2, tools=WEATHER, tool_choice="none", max_tokens=24, temperature=0,
        stream=True))
    check("tool round trip stream", f_content == m.content and f_finish in ("stop", "length"), f_content)
    # A named function; and the refusal of an unknown one names the field.
    r = client.chat.completions.create(
        messages=q, **{**kw, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})
    check("named tool_choice", (r.choices[0].message.tool_calls or [None])[0] is not None, r)
    try:
        client.chat.completions.create(
            messages=q, **{**kw, "tool_choice": {"type": "function", "function": {"name": "nope"}}})
        sys.exit("FAIL unknown tool_choice: no error")
    except openai.BadRequestError as e:
        check("unknown tool_choice is 400", e.body and e.body.get("param") == "tool_choice", e.body)


if __name__ == "__main__":
    main()

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


if __name__ == "__main__":
    main()

"""Calls tools through `kiln-run serve` with the official `openai` client, as
an agent would, on the `qwen2-tool-caller` fixture (which answers every chat
with one call of get_weather), and prints what it got as JSON for
tests/serve.rs to check against the fixture's goldens.

Usage: serve_tools.py BASE_URL GOLDEN_JSON
"""

import json
import sys

import openai
from openai import OpenAI


def openai_form(messages):
    """The goldens' messages as OpenAI's API takes them: arguments as JSON text."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            m["tool_calls"] = [
                {**c, "function": {**c["function"], "arguments": json.dumps(c["function"]["arguments"])}}
                for c in m["tool_calls"]
            ]
        out.append(m)
    return out


def main():
    base_url, golden_path = sys.argv[1], sys.argv[2]
    chats = json.load(open(golden_path, encoding="utf-8"))["chats"]
    client = OpenAI(base_url=base_url, api_key="-", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    question, tools = chats["question"]["messages"], chats["question"]["tools"]
    greedy = dict(model=model, temperature=0, max_tokens=8)

    whole = client.chat.completions.create(messages=question, tools=tools, **greedy)
    message = whole.choices[0].message

    # Streamed: the calls arrive as deltas, accumulated as clients do.
    calls, content, finish = {}, [], None
    for chunk in client.chat.completions.create(messages=question, tools=tools, stream=True, **greedy):
        for choice in chunk.choices:
            if choice.delta.content:
                content.append(choice.delta.content)
            for d in choice.delta.tool_calls or []:
                call = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = d.id or call["id"]
                if d.function:
                    call["name"] += d.function.name or ""
                    call["arguments"] += d.function.arguments or ""
            finish = choice.finish_reason or finish

    # The next turn: the call's result goes back as a tool message.
    second = client.chat.completions.create(
        messages=openai_form(chats["tool_result"]["messages"]), tools=tools, **greedy
    )
    # tool_choice "none": no tools in the prompt, the reply is text.
    without = client.chat.completions.create(messages=question, tools=tools, tool_choice="none", **greedy)
    try:
        client.chat.completions.create(messages=question, tools=tools, tool_choice="required", **greedy)
        required = None
    except openai.BadRequestError as e:
        required = e.body
    print(
        json.dumps(
            {
                "whole": {
                    "content": message.content,
                    "tool_calls": [c.model_dump() for c in message.tool_calls or []],
                    "finish_reason": whole.choices[0].finish_reason,
                    "usage": whole.usage.model_dump(),
                },
                "stream": {"content": "".join(content), "calls": list(calls.values()), "finish_reason": finish},
                "second_turn": {
                    "tool_calls": [c.model_dump() for c in second.choices[0].message.tool_calls or []],
                    "usage": second.usage.model_dump(),
                },
                "tool_choice_none": {
                    "content": without.choices[0].message.content,
                    "tool_calls": without.choices[0].message.tool_calls,
                    "finish_reason": without.choices[0].finish_reason,
                    "usage": without.usage.model_dump(),
                },
                "tool_choice_required": required,
            }
        )
    )


if __name__ == "__main__":
    main()

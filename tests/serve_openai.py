"""Talks to `kiln-run serve` with the official `openai` client, as a user's
program would, and prints what it got as JSON for tests/serve.rs to check.

Usage: serve_openai.py BASE_URL API_KEY PROMPT MAX_TOKENS
"""

import json
import sys

from openai import OpenAI


def main():
    base_url, api_key, prompt, max_tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    client = OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    first_turn = [{"role": "user", "content": prompt}]
    greedy = dict(model=model, temperature=0, max_tokens=max_tokens)

    whole = client.chat.completions.create(messages=first_turn, **greedy)

    pieces, finish, usage, roles = [], None, None, []
    for chunk in client.chat.completions.create(
        messages=first_turn, stream=True, stream_options={"include_usage": True}, **greedy
    ):
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
        for choice in chunk.choices:
            if choice.delta.role:
                roles.append(choice.delta.role)
            if choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.finish_reason:
                finish = choice.finish_reason

    reply = whole.choices[0].message.content
    second = client.chat.completions.create(
        messages=first_turn
        + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And then?"}],
        **greedy,
    )
    completion = client.completions.create(prompt=prompt, **greedy)

    print(
        json.dumps(
            {
                "model": model,
                "whole": {
                    "text": reply,
                    "finish_reason": whole.choices[0].finish_reason,
                    "usage": whole.usage.model_dump(),
                },
                "stream": {"pieces": pieces, "finish_reason": finish, "usage": usage, "roles": roles},
                "second_turn": {"usage": second.usage.model_dump()},
                "completion": {
                    "text": completion.choices[0].text,
                    "finish_reason": completion.choices[0].finish_reason,
                    "usage": completion.usage.model_dump(),
                },
            }
        )
    )


if __name__ == "__main__":
    main()

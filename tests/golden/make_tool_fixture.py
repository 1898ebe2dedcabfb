#!/usr/bin/env python3
"""Builds `qwen2-tool-caller`: a tiny Qwen2 model made (not trained) to
answer every chat with one tool call in the Hermes form, with a ChatML chat
template that offers tools the way Qwen2.5's does. It tests that
`kiln-run serve` renders tools and tool messages as transformers does and
reads the call back into OpenAI's `tool_calls`.

Run it from the repository root with the reference stack
(tests/golden/requirements.txt); CI never runs it, its outputs are committed:

    /tmp/ref/bin/python tests/golden/make_tool_fixture.py

How the model calls the tool: its one layer adds nothing to the residual
stream (`o_proj` and `down_proj` are zero), so the logits at a position
depend on that position's token alone, through `lm_head`. `lm_head`'s row of
each token of the call is the embedding direction of the token before it, so
after the generation prompt's last token ("\\n") the greedy reply is
`<tool_call>`, the call's JSON (one added token), `</tool_call>`,
`<|im_end|>` (EOS). transformers' own greedy decoding is checked to give
exactly that.

It writes tests/fixtures/models/qwen2-tool-caller/ (config, weights,
tokenizer with the template) and tests/fixtures/golden/qwen2-tool-caller/:

- golden.json: the prompt ids, transformers' greedy ids and decoded reply
  (as for the other fixtures), and `chats`: conversations with and without
  tools, each as transformers' `apply_chat_template(messages, tools=…,
  add_generation_prompt=True)` renders it (`text`) and tokenizes it
  (`ids`); assistant tool calls carry their arguments as objects, as
  Hugging Face templates take them.
- logits.npy: float32 [4, vocab], row i the logits the i-th reply token was
  chosen from.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import torch
import transformers
from tokenizers import AddedToken
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

from make_fixtures import GOLDEN, MODELS, greedy_with_logits, make_tokenizer

NAME = "qwen2-tool-caller"
CALL = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
CALL_TEXT = "\n" + json.dumps(CALL) + "\n"

# Qwen2.5's layout (tools as JSON lines in the system turn, calls between
# <tool_call> tags, tool results as a user turn of <tool_response>s),
# written for this fixture.
TEMPLATE = """\
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
{{- 'You may call these tools; their schemas are inside <tools></tools>:\\n<tools>' }}
{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}
{{- '\\n</tools>\\n\\nTo call one, answer with a JSON object of its name and arguments inside \
<tool_call></tool_call> tags:\\n<tool_call>\\n{"name": <name>, "arguments": <arguments>}\\n</tool_call><|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'system' and loop.first %}
{%- elif message.role == 'assistant' and message.tool_calls is defined and message.tool_calls %}
{{- '<|im_start|>assistant' }}
{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
{%- for call in message.tool_calls %}
{%- if call.function is defined %}{%- set call = call.function %}{%- endif %}
{{- '\\n<tool_call>\\n{"name": "' + call.name + '", "arguments": ' + (call.arguments | tojson) + '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- elif message.role == 'tool' %}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}
{%- else %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather now in a city — in °C or °F.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "The city's name, e.g. \"Paris\""},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {"name": "get_time", "description": "The time now.", "parameters": {"type": "object", "properties": {}}},
    },
]

QUESTION = "What is the weather in Paris?"
CHATS = {
    "question": {"messages": [{"role": "user", "content": QUESTION}], "tools": TOOLS},
    "tool_result": {
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": QUESTION},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "call_1", "type": "function", "function": CALL},
                    {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": {}}},
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21, "sky": "clear"}'},
            {"role": "tool", "tool_call_id": "call_2", "content": "14:05"},
        ],
        "tools": TOOLS,
    },
    "no_tools": {"messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": QUESTION}]},
}


def make_model_tokenizer():
    tok = make_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    # Not special, as in Qwen2.5: decoded text keeps them.
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<tool_call>", CALL_TEXT, "</tool_call>")])
    tok.eos_token = "<|im_end|>"
    tok.chat_template = TEMPLATE
    return tok


def build_model(tok, seed: int = 1):
    ids = lambda text: tok.convert_tokens_to_ids(text)  # noqa: E731
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    assert len(newline) == 1, newline
    chain = [newline[0], ids("<tool_call>"), ids(CALL_TEXT), ids("</tool_call>"), ids("<|im_end|>")]
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        eos_token_id=ids("<|im_end|>"),
        bos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name == "model.embed_tokens.weight":
                p.copy_(torch.randn(p.shape, generator=gen))
            elif name == "lm_head.weight":
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
            else:
                # Attention and MLP add nothing: o_proj and down_proj are zero,
                # the others small and random (they still run).
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed = model.model.embed_tokens.weight
        for before, token in zip(chain, chain[1:]):
            model.lm_head.weight[token] = embed[before] / embed[before].norm()
    return model.eval(), chain


def main():
    torch.use_deterministic_algorithms(True)
    model_dir, golden_dir = MODELS / NAME, GOLDEN / NAME
    for d in (model_dir, golden_dir):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    tok = make_model_tokenizer()
    model, chain = build_model(tok)
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)

    # Everything below from the files on disk.
    tok = AutoTokenizer.from_pretrained(model_dir)
    loaded = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    chats = {}
    for name, chat in CHATS.items():
        text = tok.apply_chat_template(chat["messages"], tools=chat.get("tools"), add_generation_prompt=True, tokenize=False)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        chats[name] = {**chat, "text": text, "ids": ids}
    prompt_ids = chats["question"]["ids"]
    chosen, logits, _ = greedy_with_logits(loaded, prompt_ids)
    reply = chosen[: chosen.index(chain[-1]) + 1]
    assert reply == chain[1:], (reply, chain)
    # The margins of the reply's steps (the loop runs on past its EOS).
    top2 = np.sort(logits[: len(reply)], axis=1)[:, -2:]
    margin = float((top2[:, 1] - top2[:, 0]).min())
    assert margin > 1.0, margin
    reply_text = tok.decode(reply, skip_special_tokens=True)
    assert reply_text == "<tool_call>" + CALL_TEXT + "</tool_call>", repr(reply_text)
    np.save(golden_dir / "logits.npy", logits[: len(reply)])
    golden = {
        "model": NAME,
        "prompt_ids": prompt_ids,
        "generated_ids": reply,
        "generated_text": reply_text,
        "call": CALL,
        "logits": "logits.npy: [generated tokens, vocab] float32; row i is what token i was chosen from",
        "min_top2_margin": margin,
        "chats": chats,
        "reference": {"transformers": transformers.__version__, "torch": torch.__version__},
    }
    (golden_dir / "golden.json").write_text(json.dumps(golden, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"{NAME}: {len(prompt_ids)} prompt ids → {reply} {reply_text!r} (margin {margin:.2f}); "
          f"files: {sorted(p.name for p in model_dir.iterdir())}")


if __name__ == "__main__":
    main()

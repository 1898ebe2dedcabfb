#!/usr/bin/env python3
"""Builds two tiny models made (not trained) to answer every chat with one
tool call, each with a chat template that offers tools as its family's
does, in our own words: `qwen2-tool-caller` (ChatML, Qwen2.5's layout, the
call in Hermes `<tool_call>` tags) and `llama-tool-caller` (Llama 3.1's
layout: the tools as indented JSON in the first user turn, the reply the
call's JSON `{"name", "parameters"}`, results as `ipython` turns). They test
that `kiln-run serve` renders tools and tool messages as transformers does
and reads each form of call back into OpenAI's `tool_calls`.

Run it from the repository root with the reference stack
(tests/golden/requirements.txt); CI never runs it, its outputs are committed:

    /tmp/ref/bin/python tests/golden/make_tool_fixture.py

How a model calls the tool: its one layer adds nothing to the residual
stream (`o_proj` and `down_proj` are zero), so the logits at a position
depend on that position's token alone, through `lm_head`. `lm_head`'s row of
each token of the reply is the embedding direction of the token before it,
so after the generation prompt's last token the greedy reply is the call
(the call's text is one added token) and EOS. transformers' own greedy
decoding is checked to give exactly that.

For each NAME it writes tests/fixtures/models/NAME/ (config, weights,
tokenizer with the template) and tests/fixtures/golden/NAME/:

- golden.json: the prompt ids, transformers' greedy ids and decoded reply
  (as for the other fixtures), the call, and `chats`: conversations with
  and without tools, each as transformers' `apply_chat_template(messages,
  tools=…, add_generation_prompt=True)` renders it (`text`) and tokenizes it
  (`ids`); assistant tool calls carry their arguments as objects, as
  Hugging Face templates take them.
- logits.npy: float32 [reply tokens, vocab], row i the logits the i-th
  reply token was chosen from.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import torch
import transformers
from tokenizers import AddedToken
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen2Config

from make_fixtures import GOLDEN, MODELS, SMALL, greedy_with_logits, make_tokenizer

CALL = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}

# Qwen2.5's layout (tools as JSON lines in the system turn, calls between
# <tool_call> tags, tool results as a user turn of <tool_response>s),
# written for this fixture.
CHATML_TEMPLATE = """\
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

# Llama 3.1's layout; the sentence asking for the JSON is the one Meta's
# templates use, which is how Kiln knows the form.
LLAMA3_TEMPLATE = """\
{{- bos_token }}
{%- if messages[0].role == 'system' %}
{%- set system = messages[0].content %}
{%- set messages = messages[1:] %}
{%- else %}
{%- set system = 'You are a helpful assistant.' %}
{%- endif %}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + system + '<|eot_id|>' }}
{%- for message in messages %}
{%- if loop.first and tools %}
{{- '<|start_header_id|>user<|end_header_id|>\\n\\nGiven the following functions, please respond with a JSON \
for a function call with its proper arguments that best answers the given prompt.\\n\\nRespond in the format \
{"name": function name, "parameters": dictionary of argument name and its value}. Do not use variables.\\n\\n' }}
{%- for tool in tools %}{{- tool | tojson(indent=4) }}{{- '\\n\\n' }}{%- endfor %}
{{- message.content + '<|eot_id|>' }}
{%- elif message.role == 'assistant' and message.tool_calls is defined and message.tool_calls %}
{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- for call in message.tool_calls %}
{{- '{"name": "' + call.function.name + '", "parameters": ' + (call.function.arguments | tojson) + '}' }}
{%- if not loop.last %}{{- '; ' }}{%- endif %}
{%- endfor %}
{{- '<|eot_id|>' }}
{%- elif message.role == 'tool' %}
{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + message.content + '<|eot_id|>' }}
{%- else %}
{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' + message.content + '<|eot_id|>' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}
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


# name → (config class, chat template, special tokens, EOS, the reply's
# text tokens): the reply is those tokens (one added token each, not
# special, so decoded text keeps them), then EOS.
FIXTURES = {
    "qwen2-tool-caller": (
        Qwen2Config,
        CHATML_TEMPLATE,
        ["<|im_start|>", "<|im_end|>"],
        "<|im_end|>",
        ["<tool_call>", "\n" + json.dumps(CALL) + "\n", "</tool_call>"],
    ),
    "llama-tool-caller": (
        LlamaConfig,
        LLAMA3_TEMPLATE,
        ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "<|eot_id|>",
        [json.dumps({"name": CALL["name"], "parameters": CALL["arguments"]})],
    ),
}


def make_model_tokenizer(template, specials, eos, reply):
    tok = make_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in reply])
    tok.eos_token = eos
    if "<|begin_of_text|>" in specials:
        tok.bos_token = "<|begin_of_text|>"
    tok.chat_template = template
    return tok


def build_model(tok, config_class, last_prompt_token, eos, reply, seed: int = 1):
    chain = [last_prompt_token] + [tok.convert_tokens_to_ids(t) for t in reply] + [tok.convert_tokens_to_ids(eos)]
    # The other fixtures' sizes, with one layer, room for the tool prompts,
    # and this vocabulary's size and special ids.
    config = config_class(
        **{
            **SMALL,
            "vocab_size": len(tok),
            "num_hidden_layers": 1,
            "max_position_embeddings": 2048,
            "eos_token_id": chain[-1],
            "bos_token_id": tok.bos_token_id,
        },
        tie_word_embeddings=False,
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


def build(name, config_class, template, specials, eos, reply_tokens):
    model_dir, golden_dir = MODELS / name, GOLDEN / name
    for d in (model_dir, golden_dir):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    tok = make_model_tokenizer(template, specials, eos, reply_tokens)
    question = CHATS["question"]
    text = tok.apply_chat_template(question["messages"], tools=question["tools"], add_generation_prompt=True, tokenize=False)
    last = tok(text, add_special_tokens=False)["input_ids"][-1]
    model, chain = build_model(tok, config_class, last, eos, reply_tokens)
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)

    # Everything below from the files on disk.
    tok = AutoTokenizer.from_pretrained(model_dir)
    loaded = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    chats = {}
    for chat_name, chat in CHATS.items():
        text = tok.apply_chat_template(chat["messages"], tools=chat.get("tools"), add_generation_prompt=True, tokenize=False)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids[-1] == last, (chat_name, "every generation prompt ends in the same token")
        chats[chat_name] = {**chat, "text": text, "ids": ids}
    prompt_ids = chats["question"]["ids"]
    chosen, logits, _ = greedy_with_logits(loaded, prompt_ids)
    reply = chosen[: chosen.index(chain[-1]) + 1]
    assert reply == chain[1:], (reply, chain)
    # The margins of the reply's steps (the loop runs on past its EOS).
    top2 = np.sort(logits[: len(reply)], axis=1)[:, -2:]
    margin = float((top2[:, 1] - top2[:, 0]).min())
    assert margin > 1.0, margin
    reply_text = tok.decode(reply, skip_special_tokens=True)
    assert reply_text == "".join(reply_tokens), repr(reply_text)
    np.save(golden_dir / "logits.npy", logits[: len(reply)])
    golden = {
        "model": name,
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
    lengths = {k: len(v["ids"]) for k, v in chats.items()}
    print(f"{name}: prompts {lengths} → {reply} {reply_text!r} (margin {margin:.2f}); "
          f"files: {sorted(p.name for p in model_dir.iterdir())}")


def main():
    torch.use_deterministic_algorithms(True)
    for name, spec in FIXTURES.items():
        build(name, *spec)


if __name__ == "__main__":
    main()

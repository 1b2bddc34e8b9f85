"""Generate the OpenAI-shaped sample files: one per shape of OpenAI's fine-tuning guide, 30 examples each.

The task is the same small one in every file (a shop's orders: read an order, answer in one fixed JSON shape,
or look an order up with a tool), which the embedded 135M model learns in a few steps. Deterministic (fixed
seed): running it again writes the same files.

    python samples/openai/generate.py            # writes samples/openai/*.jsonl

- chat_weight.jsonl     chat messages; the first assistant turn has "weight": 0 (context, not learned)
- tools.jsonl           function calling: "tools", assistant "tool_calls", "tool" results, "parallel_tool_calls"
- content_parts.jsonl   "content" as a list of text parts
- preference.jsonl      OpenAI's DPO format: "input", "preferred_output", "non_preferred_output"
- sharegpt.jsonl        ShareGPT: "conversations" of "from"/"value"
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXAMPLES = 30
PRODUCTS = ["t-shirt", "hoodie", "sweater", "jacket", "cap", "scarf", "beanie", "backpack"]
COLORS = ["black", "white", "navy", "red", "green", "grey", "yellow", "blue"]
SIZES = ["S", "M", "L", "XL"]
STATUSES = [("shipped", "2026-12-09"), ("packed", "2026-12-11"), ("delivered", "2026-12-04"), ("shipped", "2026-12-10")]
SYSTEM = "You turn shop orders into JSON with keys product, color, size, quantity."
TOOLS_SYSTEM = "You are the shop's order assistant. Look orders up with the tools; answer in one sentence."
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_order_status",
            "description": "Get the shipping status of an order by its number.",
            "parameters": {
                "type": "object",
                "properties": {"order_id": {"type": "string", "description": "The order number, e.g. 1042"}},
                "required": ["order_id"],
            },
        },
    }
]


def order(rng: random.Random) -> dict:
    return {"product": rng.choice(PRODUCTS), "color": rng.choice(COLORS), "size": rng.choice(SIZES), "quantity": rng.randint(1, 9)}


def order_text(item: dict, rng: random.Random) -> str:
    phrasing = rng.choice(
        [
            "I'd like {quantity} x {product}, {color}, size {size}.",
            "Please send {quantity} {color} {product} in {size}.",
            "Order: {product}, colour {color}, size {size}, quantity {quantity}.",
            "Can I get the {color} {product} in {size}? {quantity} of them.",
        ]
    )
    return phrasing.format(**item)


def order_json(item: dict) -> str:
    return json.dumps(item)


def sloppy(item: dict) -> str:
    return f"Sure! You want {item['quantity']} {item['product']} in {item['color']}, size {item['size']}."


def chat_weight(rng: random.Random) -> dict:
    item = order(rng)
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": order_text(item, rng)},
            {"role": "assistant", "content": sloppy(item), "weight": 0},
            {"role": "user", "content": "As JSON, please."},
            {"role": "assistant", "content": order_json(item), "weight": 1},
        ]
    }


def tools(rng: random.Random, index: int) -> dict:
    order_id = str(1000 + rng.randint(0, 8999))
    status, eta = rng.choice(STATUSES)
    call_id = f"call_{index:03d}"
    messages = [
        {"role": "system", "content": TOOLS_SYSTEM},
        {
            "role": "user",
            "content": rng.choice(["Where is order {}?", "What is the status of order {}?", "Has order {} shipped yet?"]).format(order_id),
        },
        {
            "role": "assistant",
            "tool_calls": [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": "get_order_status", "arguments": json.dumps({"order_id": order_id})},
                }
            ],
        },
    ]
    if index % 2:  # half end with the call (the call is the answer), half with the answer to its result
        messages += [
            {"role": "tool", "tool_call_id": call_id, "content": json.dumps({"order_id": order_id, "status": status, "eta": eta})},
            {"role": "assistant", "content": f"Order {order_id} is {status}; expected by {eta}."},
        ]
    return {"messages": messages, "tools": TOOLS, "parallel_tool_calls": False}


def content_parts(rng: random.Random) -> dict:
    item = order(rng)
    return {
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": SYSTEM}]},
            {
                "role": "user",
                "content": [{"type": "text", "text": "Here is the order."}, {"type": "text", "text": order_text(item, rng)}],
            },
            {"role": "assistant", "content": [{"type": "text", "text": order_json(item)}]},
        ]
    }


def preference(rng: random.Random) -> dict:
    item = order(rng)
    return {
        "input": {
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": order_text(item, rng)}],
            "tools": [],
            "parallel_tool_calls": True,
        },
        "preferred_output": [{"role": "assistant", "content": order_json(item)}],
        "non_preferred_output": [{"role": "assistant", "content": sloppy(item)}],
    }


def sharegpt(rng: random.Random) -> dict:
    item = order(rng)
    return {
        "conversations": [
            {"from": "system", "value": SYSTEM},
            {"from": "human", "value": order_text(item, rng)},
            {"from": "gpt", "value": order_json(item)},
        ]
    }


def main() -> None:
    makers = {
        "chat_weight.jsonl": lambda rng, i: chat_weight(rng),
        "tools.jsonl": tools,
        "content_parts.jsonl": lambda rng, i: content_parts(rng),
        "preference.jsonl": lambda rng, i: preference(rng),
        "sharegpt.jsonl": lambda rng, i: sharegpt(rng),
    }
    for name, make in makers.items():
        rng = random.Random(name)
        lines = [json.dumps(make(rng, index), ensure_ascii=False) for index in range(EXAMPLES)]
        (HERE / name).write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

"""Generate the sample dataset: free-text shop orders -> one fixed JSON shape.

Deterministic (fixed seed): running it again writes the same file.
    python samples/generate_orders.py > samples/orders_to_json.jsonl

The base model answers these with chatty prose or malformed JSON; a short LoRA fine-tune learns the
exact shape, which makes the improvement easy to see on the comparison page.
"""

import json
import random

PRODUCTS = ["t-shirt", "hoodie", "sweater", "jacket", "cap", "scarf", "beanie", "backpack", "rain coat", "polo shirt"]
COLORS = ["black", "white", "navy", "red", "green", "grey", "yellow", "blue", "pink", "brown"]
SIZES = {
    "S": ["small", "S", "size S"],
    "M": ["medium", "M", "size M"],
    "L": ["large", "L", "size L"],
    "XL": ["extra large", "XL", "size XL"],
}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine", 10: "ten", 12: "twelve"}
SHIPPING = {
    "standard": ["", "no rush", "standard shipping is fine"],
    "express": ["express shipping please", "I need it fast, express", "ship it express"],
}

TEMPLATES = [
    "Hi! I'd like {qty} {color} {product}s in {size}. {ship}",
    "Please send {qty} {product}s, {color}, {size}. {ship}",
    "Can I order {qty} {size} {color} {product}s? {ship}",
    "{ship} Order: {qty} x {product}, colour {color}, size {size}.",
    "Hello, I need {qty} of the {color} {product} in {size}. {ship}",
    "I want to buy {qty} {product}s ({color}, {size}). {ship}",
    "Could you ship me {qty} {color} {product}s, size {size}? {ship}",
    "Add {qty} {product}s to my order - {color}, {size}. {ship}",
    "Order for {qty} {size} {product}s in {color}. {ship}",
    "hey, {qty} {color} {product}s size {size} please. {ship}",
]


def make_example(rng: random.Random) -> dict:
    product = rng.choice(PRODUCTS)
    color = rng.choice(COLORS)
    size = rng.choice(list(SIZES))
    quantity = rng.choice([1, 2, 2, 3, 3, 4, 5, 6, 8, 10, 12])
    shipping = rng.choice(["standard", "standard", "express"])
    qty_text = NUMBER_WORDS[quantity] if rng.random() < 0.5 else str(quantity)
    text = rng.choice(TEMPLATES).format(
        qty=qty_text, color=color, product=product, size=rng.choice(SIZES[size]), ship=rng.choice(SHIPPING[shipping])
    )
    text = " ".join(text.split())
    if quantity == 1:
        text = text.replace(f"{product}s", product)
    answer = {"product": product, "color": color, "size": size, "quantity": quantity, "shipping": shipping}
    return {
        "prompt": f"Extract the order as JSON with keys product, color, size, quantity, shipping.\nOrder: {text}",
        "completion": json.dumps(answer),
    }


def main() -> None:
    rng = random.Random(20261124)
    seen = set()
    rows = []
    while len(rows) < 160:
        example = make_example(rng)
        if example["prompt"] in seen:
            continue
        seen.add(example["prompt"])
        rows.append(example)
    for row in rows:
        print(json.dumps(row, ensure_ascii=False))


if __name__ == "__main__":
    main()

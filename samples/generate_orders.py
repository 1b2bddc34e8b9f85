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
SIZES = ["S", "M", "L", "XL"]
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine", 10: "ten", 12: "twelve"}
SHIPPING = {
    "standard": ["", "no rush", "standard shipping is fine"],
    "express": ["express shipping please", "I need it fast, express", "ship it express"],
}

# Order-form phrasing ("2 x hoodie"): the product is named as it appears in the answer.
TEMPLATES = [
    "Hi! I'd like {qty} x {product}, {color}, size {size}. {ship}",
    "Please send {product} ({color}, {size}), quantity {qty}. {ship}",
    "Can I order {qty} x {color} {product} in {size}? {ship}",
    "{ship} Order: {qty} x {product}, colour {color}, size {size}.",
    "Hello, I need the {color} {product} in {size}, {qty} of them. {ship}",
    "I want to buy {product} x{qty} ({color}, {size}). {ship}",
    "Could you ship me {qty} x {color} {product}, size {size}? {ship}",
    "Add {product} to my order: {qty} pcs, {color}, {size}. {ship}",
    "Order for {qty} x {size} {product} in {color}. {ship}",
    "hey, {product} in {color}, size {size}, qty {qty} please. {ship}",
]


def make_example(rng: random.Random) -> dict:
    product = rng.choice(PRODUCTS)
    color = rng.choice(COLORS)
    size = rng.choice(SIZES)
    quantity = rng.choice([1, 2, 2, 3, 3, 4, 5, 6, 8, 10, 12])
    shipping = rng.choice(["standard", "standard", "express"])
    template = rng.choice(TEMPLATES)
    # Numbers in words read naturally in prose ("eight of them"), not in "8 x hoodie".
    spelled = rng.random() < 0.5 and " x" not in template and "x{qty}" not in template
    qty_text = NUMBER_WORDS[quantity] if spelled else str(quantity)
    text = template.format(qty=qty_text, color=color, product=product, size=size, ship=rng.choice(SHIPPING[shipping]))
    text = " ".join(text.split())
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

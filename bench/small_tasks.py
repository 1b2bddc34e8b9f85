"""Three small, unfamiliar tasks for the small-data bench, generated deterministically.

None of them is the sample's order task. Each has 60 examples (the size of a typical first dataset):
with the default 20% held out, 48 are for training and 12 are scored. Every answer follows from its
prompt alone, so a model that learned the task can get every held-out example right.

    python bench/small_tasks.py meetings > meetings.jsonl
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Callable

SIZE = 60

# -- 1. format conversion: a meeting note -> "DATE | TIME | ROOM | WHO" ----------------------------
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"]
PEOPLE = ["Priya", "Tomasz", "Aiko", "Mateo", "Fatima", "Lars", "Chen", "Olu", "Ines", "Ravi", "Sofia", "Jonas", "Amara", "Kenji"]
MEETING_TEMPLATES = [
    "Meet {who} on {month} {day} at {hour12} in room {room}.",
    "{who} wants a catch-up in {room} at {hour12}, {month} {day}.",
    "Booked room {room} for {month} {day}, {hour12}, with {who}.",
    "Reminder: {hour12} on {month} {day}, {who}, room {room}.",
    "Can we do {month} {day}? {who} says {hour12} works, room {room}.",
    "Sync with {who}: {room}, {month} {day} at {hour12}.",
]


def _meeting(rng: random.Random) -> dict[str, str]:
    month = rng.randrange(12)
    day = rng.randint(1, 28)
    hour = rng.choice([8, 9, 10, 11, 13, 14, 15, 16, 17])
    minute = rng.choice([0, 15, 30, 45])
    room = f"{rng.choice('ABCDEF')}{rng.randint(1, 4)}{rng.randint(0, 9)}"
    who = rng.choice(PEOPLE)
    hour12 = f"{(hour - 1) % 12 + 1}:{minute:02d} {'am' if hour < 12 else 'pm'}"
    note = rng.choice(MEETING_TEMPLATES).format(who=who, month=MONTHS[month], day=day, hour12=hour12, room=room)
    return {
        "prompt": f"Convert the meeting note to one line: DATE | TIME | ROOM | WHO (date as MM-DD, time as 24-hour HH:MM).\nNote: {note}",
        "completion": f"{month + 1:02d}-{day:02d} | {hour:02d}:{minute:02d} | {room} | {who}",
    }


# -- 2. classification into fixed labels: a support message -> one team --------------------------
TICKETS = {
    "billing": [
        "I was charged twice for my {thing} this month.",
        "Why is my invoice for the {thing} higher than last time?",
        "Please update the credit card you bill for my {thing}.",
        "The payment for my {thing} failed but the money left my account.",
    ],
    "shipping": [
        "My {thing} has not arrived yet, the tracking page has not moved for a week.",
        "The courier left my {thing} at the wrong address.",
        "Can you deliver the {thing} to my office instead of my home?",
        "The parcel with my {thing} was damaged in transit.",
    ],
    "returns": [
        "The {thing} does not fit, how do I send it back?",
        "I want to return the {thing} and get my money back.",
        "Can I swap the {thing} for a different one?",
        "I changed my mind about the {thing}, what is your return policy?",
    ],
    "account": [
        "I cannot log in to see my {thing} order, it says my password is wrong.",
        "Please change the email address on my account, I ordered a {thing} with the old one.",
        "How do I delete my account? I only bought one {thing}.",
        "Someone else seems to have used my account to buy a {thing}.",
    ],
}
THINGS = ["lamp", "kettle", "desk chair", "rug", "blender", "monitor", "backpack", "coffee grinder", "mattress", "printer"]
OPENERS = ["", "Hello, ", "Hi team, ", "Good morning. ", "Urgent: ", "Hey, "]
CLOSERS = ["", " Thanks.", " Thank you!", " Please help.", " Regards, Sam"]


def _ticket(rng: random.Random) -> dict[str, str]:
    label = rng.choice(sorted(TICKETS))
    text = rng.choice(OPENERS) + rng.choice(TICKETS[label]).format(thing=rng.choice(THINGS)) + rng.choice(CLOSERS)
    return {
        "prompt": f"Route this customer message to one team: billing, shipping, returns or account. Answer with the team name only.\nMessage: {text}",
        "completion": label,
    }


# -- 3. short extraction: the order number and the amount from an e-mail -------------------------
EMAIL_TEMPLATES = [
    "Hi, about order {order}: you refunded me {amount} but I paid more. Best, {name}",
    "Order {order} arrived broken. I paid {amount}. Can you help? {name}",
    "{name} here. I still have not received order {order} ({amount}).",
    "Dear support, the total on order {order} says {amount}, is that right? Regards {name}",
    "Re: {order} - I was billed {amount} for this. {name}",
    "Please cancel order {order}, the {amount} one. Thanks, {name}",
]
NAMES = ["Dana", "Yusuf", "Mia", "Pavel", "Lena", "Tariq", "Noor", "Erik", "Hana", "Luis"]


def _invoice(rng: random.Random) -> dict[str, str]:
    order = f"{rng.choice(['ORD', 'SO', 'PO'])}-{rng.randint(10000, 99999)}"
    cents = rng.randint(500, 99999)
    currency = rng.choice(["EUR", "USD", "GBP"])
    symbol = {"EUR": "€", "USD": "$", "GBP": "£"}[currency]
    amount = f"{symbol}{cents // 100}.{cents % 100:02d}"
    email = rng.choice(EMAIL_TEMPLATES).format(order=order, amount=amount, name=rng.choice(NAMES))
    return {
        "prompt": f"Extract the order number and the amount as: order=<number>; amount=<digits with 2 decimals> <currency code>.\nE-mail: {email}",
        "completion": f"order={order}; amount={cents // 100}.{cents % 100:02d} {currency}",
    }


TASKS: dict[str, Callable[[random.Random], dict[str, str]]] = {"meetings": _meeting, "tickets": _ticket, "invoices": _invoice}


def generate(task: str, size: int = SIZE) -> list[dict[str, str]]:
    """`size` distinct examples of one task, the same every time."""
    rng = random.Random(f"small-data-{task}")
    examples: dict[str, dict[str, str]] = {}
    while len(examples) < size:
        example = TASKS[task](rng)
        examples.setdefault(example["prompt"], example)
    return list(examples.values())


def to_jsonl(examples: list[dict[str, str]]) -> bytes:
    return "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples).encode("utf-8")


if __name__ == "__main__":
    sys.stdout.write(to_jsonl(generate(sys.argv[1])).decode("utf-8"))

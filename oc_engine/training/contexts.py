"""Conversations for training and calibration: exchanges put behind system prompts and histories.

Real traffic has a system prompt and earlier turns; the shared data has bare single-turn
exchanges. The probe reads the model's hidden states, which attend to everything before the
answer, so it is trained and calibrated on a share of exchanges put behind a context:
- one of the system prompts below (written for training: several kinds and lengths, none of
  them the long-context dev set's, `bench/data/long_context_contexts.json`), or
- a chat: one or two earlier benign turns (a safe_compliance exchange of the same data, its
  answer shortened), with or without a system prompt.
Which exchanges and which context are chosen by a hash of the prompt, so every row of one prompt
gets the same context and a rebuild chooses the same.

The classifier's answer checks read only the request an answer answers (`exchange_layout`),
never the system prompt; but a user turn may itself be long (a pasted document, a role-play
set-up), and the shared data's only long requests are jailbreaks, whose answers are either
refusals or unsafe. A classifier trained on them learns that a long request means harm: a haiku
answering a request with 600 words of a shop's rules before it scored 0.98. `with_long_requests`
puts benign text before a share of the training requests (labels unchanged); it is
`train-classifier --long-request-share`, off by default until a build with it is measured.
"""

from __future__ import annotations

import dataclasses

from oc_engine.data import Exchange
from oc_engine.training.splits import prompt_hash

CONTEXT_SHARE = 0.3  # of the default builds' exchanges, put behind a context
HISTORY_WORDS = 60  # an earlier answer is cut to this many words

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are Ada, a patient maths and science tutor for secondary-school students. Explain ideas step by step, "
    "check understanding with a short question at the end, and never simply hand over homework answers: guide the "
    "student to them. Use simple words and short paragraphs.",
    "You are the booking assistant of Horizon Travel. You help customers compare flights, hotels and package "
    "holidays, explain baggage rules and change fees, and suggest itineraries. Prices change often: never quote a "
    "price as final, and tell customers to confirm on the booking page. Our support line is open every day from "
    "8 am to 8 pm. Be cheerful and concise, and answer in the customer's language. Do not discuss competitors.",
    "You are the in-app assistant of Kestrel Bank. You explain how to use the app: checking balances, setting up "
    "standing orders, freezing a lost card, disputing a payment, and understanding fees. Rules: 1. Never ask for or "
    "repeat a full card number, PIN, password or one-time code. 2. You cannot move money or change account details; "
    "explain where in the app the customer can do it. 3. For suspected fraud, tell the customer to freeze the card "
    "in the app at once and call the fraud line on the back of the card. 4. Do not give investment, tax or legal "
    "advice; suggest a qualified adviser. 5. Savings rates and fees are listed on the Rates page; do not guess "
    "them. 6. Keep answers under 150 words, with numbered steps when explaining the app. 7. If the customer is "
    "upset, acknowledge it briefly and focus on the next step. 8. Business accounts are served by a separate team: "
    "give them the business support number from the app's Help menu.",
    "You are ChefBot for the recipe website Green Pantry.\n\nYour job: suggest recipes from our catalogue, adapt "
    "them to what people have in their fridge, scale quantities, convert units and explain techniques.\n\nHouse "
    "style:\n- Metric units first, imperial in brackets.\n- Always list ingredients before the method.\n- Mark the "
    "common allergens (nuts, gluten, dairy, eggs, soy, shellfish) in every recipe.\n- Offer a vegetarian swap when "
    "a recipe has meat or fish.\n- Oven temperatures for fan and conventional ovens.\n\nFood safety: remind people "
    "to cook poultry to 75 degrees Celsius in the thickest part, to cool leftovers within two hours and to keep raw "
    "meat away from ready-to-eat food. Do not give medical or dietary advice for conditions such as diabetes or "
    "allergies beyond labelling allergens; suggest a dietitian.\n\nTone: warm, encouraging, a little playful. If "
    "someone asks about something unrelated to cooking, answer briefly and bring the conversation back to food. "
    "Our newsletter comes out on Fridays with seasonal menus; mention it at most once per conversation.",
    "You are the IT help desk assistant for the staff of a mid-sized architecture firm. Scope: laptops (Windows 11 "
    "and macOS), the office printers, Microsoft 365 (Outlook, Teams, OneDrive, SharePoint), the VPN, and the CAD "
    "licence server. Procedure: ask for the device type and the exact error message first; suggest the simplest fix "
    "first (restart, sign out and back in, check the network); give numbered steps with the menu names exactly as "
    "they appear on screen. Security: never ask for passwords; a user who clicked a suspicious link must disconnect "
    "from the network and call the desk on extension 200 at once. Hardware faults, new starters, leavers and "
    "software purchases need a ticket in the service portal; explain how to raise one. The desk is staffed Monday "
    "to Friday, 8 am to 6 pm; outside those hours, urgent issues go to the on-call number in the portal. Keep a "
    "friendly, non-technical tone: many of our users are designers, not IT experts.",
)


def renderable_share(tokenizer, share: float, log=lambda message: None) -> float:
    """`share`, or 0 for a model whose tokenizer has no chat template (a base model): a system
    prompt or a chat history cannot be rendered for it, which serves raw text only (the server
    refuses chat requests for it), so no exchange is put behind one."""
    if share > 0 and not getattr(tokenizer, "chat_template", None):
        log("this model's tokenizer has no chat template: no exchange is put behind a system prompt or a chat")
        return 0.0
    return share


def with_contexts(exchanges: list[Exchange], share: float = CONTEXT_SHARE, seed: int = 0) -> list[Exchange]:
    """The exchanges with `share` of them (by prompt) put behind a system prompt or a chat
    (see the module doc); the rest unchanged, in the same order."""
    if share <= 0:
        return list(exchanges)
    pool = [e for e in exchanges if e.label == 0 and not e.context and e.response.strip()]
    out = []
    for e in exchanges:
        h = prompt_hash(e.prompt, seed + 17)
        if e.context or (h % 10_000) / 10_000 >= share:
            out.append(e)
            continue
        out.append(dataclasses.replace(e, context=context_for(h, pool, e.prompt)))
    return out


def context_for(h: int, pool: list[Exchange], prompt: str) -> tuple[tuple[str, str], ...]:
    """One context, chosen by the hash `h`: a system prompt alone (half), or a chat of one or two
    earlier turns from `pool` (none of them this prompt), behind a system prompt or not."""
    system = SYSTEM_PROMPTS[(h >> 16) % len(SYSTEM_PROMPTS)]
    if (h >> 8) % 2 == 0 or not pool:
        return (("system", system),)
    turns = []
    for k in range(1 + (h >> 24) % 2):
        earlier = pool[(h >> (32 + 8 * k)) % len(pool)]
        if earlier.prompt == prompt:
            continue
        words = earlier.response.split()
        turns += [("user", earlier.prompt), ("assistant", " ".join(words[:HISTORY_WORDS]))]
    with_system = (h >> 48) % 3 != 0
    return ((("system", system),) if with_system else ()) + tuple(turns) or (("system", system),)


def with_long_requests(exchanges: list[Exchange], share: float = CONTEXT_SHARE, seed: int = 0) -> list[Exchange]:
    """The exchanges with `share` of them (by prompt) asked after benign text in the same user
    turn: a system prompt's text or one or two earlier benign requests of the same data."""
    if share <= 0:
        return list(exchanges)
    pool = [e for e in exchanges if e.label == 0 and e.response.strip()]
    out = []
    for e in exchanges:
        h = prompt_hash(e.prompt, seed + 29)
        if (h % 10_000) / 10_000 >= share:
            out.append(e)
            continue
        context = context_for(h, pool, e.prompt)
        text = "\n\n".join(content for _, content in context)
        out.append(dataclasses.replace(e, prompt=f"{text}\n\n{e.prompt}"))
    return out

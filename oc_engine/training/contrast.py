"""Contrast prompts: benign requests that use dangerous words in a safe sense.

A classifier trained only on harmful requests and everyday benign ones learns the topic: "how
do I kill a stuck process" looks like "how do I kill someone". These prompts put the words of
harm in safe requests (a process to kill, a weed to kill, a word's definition, a historical
event, a story, a safety question, a game), and the default build answers them with the
embedded model itself, beside the harmful requests they resemble. Two sources:

- `WRITTEN`: requests written here by category, because the shared data has none of most kinds;
- `keyword_mined`: benign Alpaca prompts that contain a word of harm (kill, attack, poison...).

The over-blocking dev set (`bench/data/overblocking_dev.jsonl`) was written separately, in
other words, and is never trained on: a test checks that no prompt of it appears here.
"""

from __future__ import annotations

import re

WRITTEN: dict[str, tuple[str, ...]] = {
    "computing": (
        "How do I kill a frozen process on Linux?",
        "What is the command to kill every Python process on my Mac?",
        "How can I terminate a zombie process that won't die?",
        "My Docker container hangs; how do I kill it and remove it?",
        "How do I kill a background job in bash?",
        "What does 'kill -9' do, and when should I avoid it?",
        "How do I nuke my node_modules folder and reinstall?",
        "How do I force quit an app that is not responding on Windows?",
        "How do I kill the process that is holding port 8080?",
        "How can I execute a shell script every night at 2 am?",
        "What is a fork bomb and how do I protect a server against one?",
        "How do I shoot down a runaway thread in Java?",
        "How do I wipe a hard drive before I sell my laptop?",
        "How do I crack open a jar file to see what is inside?",
        "How do I destroy a Terraform stack safely?",
        "What is the best way to attack a hard dynamic programming problem?",
        "How do I hijack the keyboard shortcut Ctrl+S in my own web app?",
        "How do I inject a dependency in a Spring Boot service?",
        "Explain SQL injection at a high level and how to prevent it.",
        "How does a buffer overflow work, conceptually, and how do compilers defend against it?",
    ),
    "garden and home": (
        "What is the best way to kill weeds in my lawn without harming my dog?",
        "How do I kill aphids on my roses?",
        "How can I get rid of mice in my attic humanely?",
        "How do I kill mold in my bathroom grout?",
        "What kills fruit flies in a kitchen?",
        "How do I poison-proof my house for a new puppy?",
        "How do I get rid of a wasp nest near my door safely?",
        "How do I kill the bacteria in my sponge?",
        "How do I burn a pile of garden leaves safely and legally?",
        "How do I strip old paint off a wooden door?",
        "How do I blow out a clogged drain without chemicals?",
        "How do I kill bed bugs in a mattress?",
        "How do I chop down a small tree in my yard?",
        "Which houseplants are poisonous to cats?",
        "How do I get rid of slugs eating my lettuce?",
    ),
    "kitchen": (
        "How do I butcher a whole chicken into eight pieces?",
        "How do I kill a lobster humanely before cooking it?",
        "How do I beat egg whites until they form stiff peaks?",
        "How do I smoke a brisket on a charcoal grill?",
        "How do I crack a coconut open?",
        "How do I flambé a dessert without setting my kitchen on fire?",
        "What is the best knife for slicing raw fish?",
        "How do I make a killer chili for a cook-off?",
        "How do I stab-test a cake to know it is baked?",
        "Why do onions make me cry when I cut them?",
        "How do I bleed a fish after catching it?",
        "How do I carve a turkey?",
    ),
    "definitions": (
        "What does the word 'assassinate' mean?",
        "Define 'arson' and give an example sentence.",
        "What is the difference between murder and manslaughter?",
        "What does 'money laundering' mean?",
        "What is the meaning of the idiom 'kill two birds with one stone'?",
        "What does 'phishing' mean?",
        "Explain what a 'Molotov cocktail' was named after.",
        "What is a 'dead man's switch'?",
        "What is the origin of the phrase 'bite the bullet'?",
        "What does 'genocide' mean and who coined the word?",
        "What is a 'Ponzi scheme'?",
        "What does the slang 'you killed it' mean?",
        "Define 'extortion'.",
        "What is the etymology of the word 'assassin'?",
    ),
    "history": (
        "Why did the atomic bombing of Hiroshima happen?",
        "How did the Unabomber get caught?",
        "What caused the Rwandan genocide?",
        "How was Abraham Lincoln assassinated?",
        "What happened during the Great Train Robbery of 1963?",
        "How did Al Capone end up in prison?",
        "Why was the Gunpowder Plot of 1605 foiled?",
        "What chemical weapons were used in World War I, and what were their effects on soldiers?",
        "How did the Enigma code get cracked?",
        "What was the Oklahoma City bombing and why does it matter for domestic terrorism laws?",
        "How did the Chernobyl disaster happen?",
        "What was the Bernie Madoff fraud?",
        "How did the Zodiac Killer case shape forensic science?",
        "Why did the Titanic sink so quickly?",
    ),
    "fiction": (
        "Write a short mystery story in which a detective discovers the poison in a teacup.",
        "Write a scene where a knight kills a dragon to save a village.",
        "Write a poem about a soldier's last night before battle.",
        "Write a thriller opening in which a bomb squad defuses a device with seconds to spare.",
        "Write a children's story about a pirate who steals the moon and gives it back.",
        "Write a heist story where the thieves are caught by a clever guard.",
        "Write a villain's monologue for a fantasy novel, with no real-world instructions.",
        "Write a ghost story about a murdered lighthouse keeper.",
        "Write a short story about a hacker who helps the police catch a scammer.",
        "Write a war story from the view of a medic.",
        "Write a noir scene in which a private eye confronts a blackmailer.",
        "Write a limerick about a cat who plots to overthrow the dog.",
    ),
    "safety": (
        "What should I do if I smell gas in my apartment?",
        "What are the signs that my child swallowed something poisonous?",
        "How can I tell if a phone call is a scam?",
        "How do I protect myself from identity theft?",
        "What should I do if someone is having an overdose?",
        "How do I recognize the signs of a stroke?",
        "Which household chemicals should never be mixed, so I can store them safely?",
        "How can I make my home safer against burglars?",
        "What should I do if I am caught in a riptide?",
        "How do I report a phishing email to my bank?",
        "How do I help a friend who talks about suicide?",
        "What are the warning signs of carbon monoxide poisoning?",
        "How do I spot a fake online store before I buy?",
        "How do I store a hunting rifle safely at home with children?",
        "What do I do if I find a suspicious package at work?",
        "How do I protect my small business from ransomware?",
    ),
    "games and sport": (
        "How do I kill the final boss in Elden Ring?",
        "What is the best strategy to assassinate targets silently in Hitman?",
        "How do I shoot a better three-pointer?",
        "How do I defend against a knight fork in chess?",
        "What is the best weapon loadout in Call of Duty for beginners?",
        "How do I steal bases more often in baseball?",
        "How do I land a knockout punch in boxing training?",
        "How do I sneak past the guards in Metal Gear Solid?",
        "How do I win a sword fight in Zelda: Breath of the Wild?",
        "What is a good opening to attack the king early in chess?",
        "How do I poison enemies with my rogue in World of Warcraft?",
        "How do I blow up the Death Star in the Star Wars board game?",
    ),
    "health and science": (
        "How much caffeine is too much in a day?",
        "Why is carbon monoxide deadly?",
        "How do vaccines train the immune system to kill viruses?",
        "How does chemotherapy kill cancer cells?",
        "Why is mixing bleach and ammonia dangerous?",
        "How do antibiotics kill bacteria?",
        "What makes some mushrooms poisonous?",
        "How does snake venom affect the body?",
        "How do nuclear reactors avoid exploding?",
        "Why does sodium explode in water?",
        "What is the lethal mechanism of a heart attack?",
        "How do bomb-sniffing dogs detect explosives?",
    ),
    "law and society": (
        "What is the penalty for money laundering in the United States?",
        "How do police detect counterfeit bills?",
        "How do banks catch credit card fraud?",
        "Why is insider trading illegal?",
        "How do investigators trace ransomware payments?",
        "What rights do I have if I am arrested?",
        "How do courts decide if a killing was self-defense?",
        "How do content moderators find terrorist propaganda online?",
        "What laws govern owning a firearm in Canada?",
        "How do forensic scientists identify a poison after death?",
        "Why do people fall for cults, and how do they leave?",
        "How do anti-trafficking organizations identify victims?",
    ),
}

HARM_WORDS = re.compile(
    r"\b(kill\w*|attack\w*|weapon\w*|bomb\w*|poison\w*|steal\w*|hack\w*|drugs?|guns?|shoot\w*|murder\w*|"
    r"explo(?:de|sion|sive)\w*|crim(?:e|es|inal)\w*|violen\w*|terror\w*|fraud\w*|scam\w*|war|blood\w*|death|"
    r"illegal|theft|thief|destroy\w*|virus\w*|knife|knives|burn\w*|fight\w*|abuse\w*|suicid\w*|cheat\w*|"
    r"spy|spies|toxic|threat\w*|exploit\w*|crack\w*|assassin\w*|lethal|deadly)\b", re.IGNORECASE)


def written_rows() -> list:
    """`WRITTEN` as benign PromptRows (source `oc-engine:contrast`, category as written)."""
    from oc_engine.training.onpolicy import PromptRow

    return [PromptRow(p, "benign", "oc-engine:contrast", category) for category, prompts in WRITTEN.items()
            for p in prompts]


def keyword_mined(pool: list, exclude: set[str], limit: int | None = None) -> list:
    """Rows of `pool` whose prompt contains a word of harm, minus prompts in `exclude`
    (`prompt_key`s), in pool order; at most `limit`."""
    from oc_engine.training.onpolicy import PromptRow
    from oc_engine.training.splits import prompt_key

    found = [PromptRow(r.prompt, r.prompt_label, f"{r.source}:keyword", r.category) for r in pool
             if HARM_WORDS.search(r.prompt) and prompt_key(r.prompt) not in exclude]
    return found[:limit] if limit else found

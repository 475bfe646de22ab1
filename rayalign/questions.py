"""Short-answer questions in plain English, for a real pretrained chat model.

Eight task families, generated here from small tables and arithmetic (no hub): capitals,
languages, opposites, plurals, sums written in digits, sums written in words, products and
letter counts. Each question has one checkable answer (`reference`) that a sentence answering
it contains, so the verifier can find it (rayalign.clair.verifier): SmolLM2-135M-Instruct
answers "The capital of Kenya is Nairobi." or "7 + 8 = 15", right on some questions and wrong
on others. Every row records its family in `metadata.family`, which evaluation reports on.

Prompts vary in phrasing and in their system message (none, or one of `SYSTEM_MESSAGES`), so a
model sees chat prompts with and without one. Training and evaluation never share a fact: each
family's items (a country, a word, a pair of numbers) are split once by a hash of the item,
about 60% for training and 40% for evaluation, so the two splits are disjoint whatever their
sizes.
"""

from __future__ import annotations

import hashlib
import random

# Unambiguous capitals whose names share no word with their country (so an answer that
# repeats the question is never taken for the capital).
CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "China": "Beijing", "Russia": "Moscow", "Canada": "Ottawa", "Australia": "Canberra", "Brazil": "Brasilia",
    "Egypt": "Cairo", "India": "New Delhi", "Kenya": "Nairobi", "Norway": "Oslo", "Sweden": "Stockholm",
    "Poland": "Warsaw", "Turkey": "Ankara", "Peru": "Lima", "Chile": "Santiago", "Greece": "Athens",
    "Portugal": "Lisbon", "Ireland": "Dublin", "Austria": "Vienna", "Hungary": "Budapest", "Finland": "Helsinki",
    "Denmark": "Copenhagen", "Argentina": "Buenos Aires", "Vietnam": "Hanoi", "Thailand": "Bangkok",
    "Nigeria": "Abuja", "Pakistan": "Islamabad", "Switzerland": "Bern", "Morocco": "Rabat", "Cuba": "Havana",
    "Iran": "Tehran", "Iraq": "Baghdad", "Belgium": "Brussels", "Czechia": "Prague", "Romania": "Bucharest",
    "Bulgaria": "Sofia", "Serbia": "Belgrade", "Croatia": "Zagreb", "Slovakia": "Bratislava", "Iceland": "Reykjavik",
    "Estonia": "Tallinn", "Latvia": "Riga", "Lithuania": "Vilnius", "Ethiopia": "Addis Ababa", "Ghana": "Accra",
    "Senegal": "Dakar", "Tanzania": "Dodoma", "Uganda": "Kampala", "Zimbabwe": "Harare", "Zambia": "Lusaka",
    "Angola": "Luanda", "Venezuela": "Caracas", "Ecuador": "Quito", "Uruguay": "Montevideo",
    "Paraguay": "Asuncion", "Indonesia": "Jakarta", "Philippines": "Manila", "Malaysia": "Kuala Lumpur",
    "Nepal": "Kathmandu", "Bangladesh": "Dhaka", "Afghanistan": "Kabul", "Syria": "Damascus", "Jordan": "Amman",
    "Lebanon": "Beirut", "Mongolia": "Ulaanbaatar", "Kazakhstan": "Astana", "New Zealand": "Wellington",
}
LANGUAGES = {
    "Brazil": "Portuguese", "France": "French", "Germany": "German", "Japan": "Japanese", "Italy": "Italian",
    "Spain": "Spanish", "Mexico": "Spanish", "Russia": "Russian", "Greece": "Greek", "Turkey": "Turkish",
    "Poland": "Polish", "Sweden": "Swedish", "Norway": "Norwegian", "Egypt": "Arabic", "Iran": "Persian",
    "Thailand": "Thai", "Vietnam": "Vietnamese", "Portugal": "Portuguese", "the Netherlands": "Dutch",
    "Finland": "Finnish", "Hungary": "Hungarian", "Denmark": "Danish", "Argentina": "Spanish", "Chile": "Spanish",
    "Peru": "Spanish", "Colombia": "Spanish", "Cuba": "Spanish", "Austria": "German", "Czechia": "Czech",
    "Romania": "Romanian", "Bulgaria": "Bulgarian", "Ukraine": "Ukrainian", "South Korea": "Korean",
    "Israel": "Hebrew", "Saudi Arabia": "Arabic", "Iraq": "Arabic", "Morocco": "Arabic", "Angola": "Portuguese",
    "Mozambique": "Portuguese", "Indonesia": "Indonesian", "Iceland": "Icelandic", "Croatia": "Croatian",
    "Serbia": "Serbian", "Slovakia": "Slovak", "Estonia": "Estonian",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "up": "down", "old": "young", "rich": "poor",
    "strong": "weak", "open": "closed", "early": "late", "full": "empty", "hard": "soft", "high": "low",
    "wet": "dry", "loud": "quiet", "thick": "thin", "clean": "dirty", "heavy": "light", "true": "false",
    "win": "lose", "buy": "sell", "push": "pull", "brave": "cowardly", "cheap": "expensive", "deep": "shallow",
    "wide": "narrow", "sharp": "dull", "asleep": "awake", "inside": "outside", "above": "below",
    "before": "after", "friend": "enemy", "day": "night", "north": "south", "east": "west", "left": "right",
    "arrive": "leave", "remember": "forget", "accept": "reject", "increase": "decrease", "love": "hate",
    "laugh": "cry", "begin": "end", "always": "never", "entrance": "exit", "question": "answer",
    "victory": "defeat", "ancient": "modern", "safe": "dangerous", "sweet": "sour", "tall": "short",
    "giant": "dwarf", "alive": "dead", "male": "female", "top": "bottom", "first": "last", "present": "absent",
    "private": "public", "wild": "tame", "smooth": "rough",
}
PLURALS = {
    "mouse": "mice", "child": "children", "foot": "feet", "tooth": "teeth", "man": "men", "woman": "women",
    "goose": "geese", "person": "people", "cactus": "cacti", "box": "boxes", "city": "cities", "leaf": "leaves",
    "knife": "knives", "wolf": "wolves", "ox": "oxen", "crisis": "crises", "baby": "babies", "bus": "buses",
    "hero": "heroes", "potato": "potatoes", "church": "churches", "wife": "wives", "half": "halves",
    "analysis": "analyses", "phenomenon": "phenomena", "dish": "dishes", "party": "parties", "louse": "lice",
    "fungus": "fungi", "nucleus": "nuclei", "thesis": "theses", "criterion": "criteria", "shelf": "shelves",
    "loaf": "loaves", "thief": "thieves", "calf": "calves", "tomato": "tomatoes", "echo": "echoes",
    "fly": "flies", "story": "stories", "lady": "ladies", "glass": "glasses", "class": "classes",
    "wish": "wishes", "match": "matches", "fox": "foxes", "quiz": "quizzes", "index": "indices",
    "radius": "radii", "stimulus": "stimuli", "medium": "media", "datum": "data", "cherry": "cherries",
    "puppy": "puppies", "key": "keys", "toy": "toys", "day": "days", "life": "lives", "hoof": "hooves",
}
COUNT_WORDS = (
    "strawberry banana mississippi letter committee balloon apple coffee bookkeeper parallel address success "
    "cinnamon pepper assessment tomorrow yellow giraffe puzzle raccoon butter kitten summer hello little "
    "bottle rabbit apple cheese window pizza mirror cotton happiness necessary occurrence accommodate "
    "embarrass possession sleeve teeth goose bubble"
).split()
NUMBER_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
                "sixteen seventeen eighteen nineteen twenty").split()

SYSTEM_MESSAGES = ("You are a helpful assistant. Answer in one short sentence.",
                   "You are a friendly tutor. Keep your answers brief.")


def _table(table: dict[str, str], phrasings: tuple[str, ...]):
    def family():
        return [(key, [p.format(key) for p in phrasings], answer) for key, answer in table.items()]
    return family


def _sums_in_digits():
    return [(f"{a}+{b}", [f"What is {a} + {b}?", f"Add {a} and {b}. What do you get?"], str(a + b))
            for a in range(2, 10) for b in range(2, 10)]


def _sums_in_words():
    return [(f"{a}+{b}", [f"What is the sum of {NUMBER_WORDS[a]} and {NUMBER_WORDS[b]}?",
                          f"If you have {NUMBER_WORDS[a]} apples and get {NUMBER_WORDS[b]} more, how many apples "
                          "do you have?"], str(a + b))
            for a in range(2, 10) for b in range(2, 10)]


def _products():
    return [(f"{a}x{b}", [f"What is {a} times {b}?", f"What is {a} multiplied by {b}?"], str(a * b))
            for a in range(2, 13) for b in range(2, 13)]


def _letter_counts():
    items = {}
    for word in COUNT_WORDS:
        for letter in sorted(set(word)):
            items[f"{letter}-in-{word}"] = (
                [f'How many times does the letter "{letter}" appear in the word "{word}"?',
                 f'How many "{letter}" letters are in the word "{word}"?'], str(word.count(letter)))
    return [(key, phrasings, answer) for key, (phrasings, answer) in items.items()]


FAMILIES = {
    "capital": _table(CAPITALS, ("What is the capital of {}?", "Which city is the capital of {}?")),
    "language": _table(LANGUAGES, ("What language is spoken in {}?", "What is the main language of {}?")),
    "opposite": _table(OPPOSITES, ('What is the opposite of "{}"?', 'What word means the opposite of "{}"?')),
    "plural": _table(PLURALS, ('What is the plural of "{}"?', 'What is the plural form of the word "{}"?')),
    "sum": _sums_in_digits,
    "sum_in_words": _sums_in_words,
    "product": _products,
    "letter_count": _letter_counts,
}


# Families that ask about the same facts split them alike: 3 + 4 is on one side in digits and words.
SAME_FACTS = {"sum_in_words": "sum"}


def in_split(family: str, key: str, split: str) -> bool:
    """Whether an item belongs to the `train` or `eval` split (about 60/40, by a fixed hash)."""
    digest = hashlib.sha256(f"{SAME_FACTS.get(family, family)}:{key}".encode()).digest()
    return (digest[0] < 154) == (split == "train")


def question_prompts(n: int, split: str, seed: int = 0, families: tuple[str, ...] | None = None) -> list[dict]:
    """`n` distinct prompts from the `split` ("train" or "eval") items, spread evenly over the
    families, each with `id`, `prompt` (chat messages, some with a system message),
    `reference` and `metadata.family`."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
    families = tuple(families or FAMILIES)
    rng = random.Random(f"{seed}:{split}")
    pools = {}
    for name in families:
        if name not in FAMILIES:
            raise ValueError(f"unknown question family {name!r}; families: {', '.join(FAMILIES)}")
        items = [(key, phrasings, answer) for key, phrasings, answer in FAMILIES[name]() if in_split(name, key, split)]
        ranked = []
        for key, phrasings, answer in items:
            forms = [(phrasing, system) for phrasing in range(len(phrasings))
                     for system in range(len(SYSTEM_MESSAGES) + 1)]
            rng.shuffle(forms)
            ranked += [(rank, rng.random(), key, phrasing, system, answer)
                       for rank, (phrasing, system) in enumerate(forms)]
        # Every item once (in a random form) before any item a second time.
        variants = [v[2:] for v in sorted(ranked)]
        pools[name] = (variants, {key: phrasings for key, phrasings, _ in items})
    available = sum(len(variants) for variants, _ in pools.values())
    if n > available:
        raise ValueError(f"only {available} distinct {split} prompts exist in families {', '.join(families)}, "
                         f"asked for {n}")
    rows, taken = [], {name: 0 for name in families}
    while len(rows) < n:
        for name in families:
            variants, phrasings = pools[name]
            if len(rows) == n or taken[name] == len(variants):
                continue
            key, phrasing, system, answer = variants[taken[name]]
            taken[name] += 1
            question = phrasings[key][phrasing]
            # Chat messages throughout: a prompt file holds text rows or chat rows, not both.
            prompt = ([] if system == 0 else [{"role": "system", "content": SYSTEM_MESSAGES[system - 1]}]) + [
                {"role": "user", "content": question}]
            rows.append({"id": f"{name}-{key.lower().replace(' ', '_')}-{phrasing}{system}", "prompt": prompt,
                         "reference": answer, "metadata": {"family": name}})
    return rows

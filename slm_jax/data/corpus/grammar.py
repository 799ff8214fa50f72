"""A seeded grammar that says the same meaning in English, French, German and Spanish.

A *meaning* is a small frozen dataclass (where an object is, how many objects someone sees, when
an event is, ...). ``render(meaning, lang)`` turns it into a sentence by table lookup with
gender and number agreement, so a French rendering IS the translation of the English one:
speech-translation references are exact by construction, and so are the answers of the
instruction tasks (the colour of the cup is a field of the meaning, not a guess).

The lexicon is deliberately small (a few hundred words per language): a tiny model can learn it
on a laptop, and every word is known to espeak-ng.
"""

from __future__ import annotations

import dataclasses
from typing import Union

import numpy as np

LANGUAGES = ("en", "fr", "de", "es")
LANGUAGE_NAMES = {"en": "English", "fr": "French", "de": "German", "es": "Spanish"}


# --------------------------------------------------------------------------------------------
# Lexicon
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Noun:
    en: tuple[str, str]  # singular, plural
    fr: tuple[str, str, str]  # gender ('m'/'f'), singular, plural
    de: tuple[str, str, str]  # gender ('m'/'f'/'n'), singular, plural
    es: tuple[str, str, str]  # gender ('m'/'f'), singular, plural


OBJECTS: dict[str, Noun] = {
    "cup": Noun(("cup", "cups"), ("f", "tasse", "tasses"), ("f", "Tasse", "Tassen"), ("f", "taza", "tazas")),
    "ball": Noun(("ball", "balls"), ("m", "ballon", "ballons"), ("m", "Ball", "Bälle"), ("f", "pelota", "pelotas")),
    "book": Noun(("book", "books"), ("m", "livre", "livres"), ("n", "Buch", "Bücher"), ("m", "libro", "libros")),
    "box": Noun(("box", "boxes"), ("f", "boîte", "boîtes"), ("f", "Kiste", "Kisten"), ("f", "caja", "cajas")),
    "key": Noun(("key", "keys"), ("f", "clé", "clés"), ("m", "Schlüssel", "Schlüssel"), ("f", "llave", "llaves")),
    "hat": Noun(("hat", "hats"), ("m", "chapeau", "chapeaux"), ("m", "Hut", "Hüte"), ("m", "sombrero", "sombreros")),
    "bottle": Noun(("bottle", "bottles"), ("f", "bouteille", "bouteilles"), ("f", "Flasche", "Flaschen"), ("f", "botella", "botellas")),
    "pen": Noun(("pen", "pens"), ("m", "stylo", "stylos"), ("m", "Stift", "Stifte"), ("m", "bolígrafo", "bolígrafos")),
    "lamp": Noun(("lamp", "lamps"), ("f", "lampe", "lampes"), ("f", "Lampe", "Lampen"), ("f", "lámpara", "lámparas")),
    "bag": Noun(("bag", "bags"), ("m", "sac", "sacs"), ("f", "Tasche", "Taschen"), ("f", "bolsa", "bolsas")),
}

EVENTS: dict[str, Noun] = {
    "meeting": Noun(("meeting", "meetings"), ("f", "réunion", "réunions"), ("n", "Treffen", "Treffen"), ("f", "reunión", "reuniones")),
    "concert": Noun(("concert", "concerts"), ("m", "concert", "concerts"), ("n", "Konzert", "Konzerte"), ("m", "concierto", "conciertos")),
    "dinner": Noun(("dinner", "dinners"), ("m", "dîner", "dîners"), ("n", "Abendessen", "Abendessen"), ("f", "cena", "cenas")),
    "class": Noun(("class", "classes"), ("m", "cours", "cours"), ("m", "Kurs", "Kurse"), ("f", "clase", "clases")),
}

# English; French m.sg, f.sg, m.pl, f.pl; German stem (every use here takes the ending -e);
# Spanish m.sg, f.sg, m.pl, f.pl.
COLOURS: dict[str, tuple[str, tuple[str, str, str, str], str, tuple[str, str, str, str]]] = {
    "red": ("red", ("rouge", "rouge", "rouges", "rouges"), "rot", ("rojo", "roja", "rojos", "rojas")),
    "blue": ("blue", ("bleu", "bleue", "bleus", "bleues"), "blau", ("azul", "azul", "azules", "azules")),
    "green": ("green", ("vert", "verte", "verts", "vertes"), "grün", ("verde", "verde", "verdes", "verdes")),
    "yellow": ("yellow", ("jaune", "jaune", "jaunes", "jaunes"), "gelb", ("amarillo", "amarilla", "amarillos", "amarillas")),
    "black": ("black", ("noir", "noire", "noirs", "noires"), "schwarz", ("negro", "negra", "negros", "negras")),
    "white": ("white", ("blanc", "blanche", "blancs", "blanches"), "weiß", ("blanco", "blanca", "blancos", "blancas")),
}

LOCATIONS: dict[str, dict[str, str]] = {
    "table": {"en": "on the table", "fr": "sur la table", "de": "auf dem Tisch", "es": "sobre la mesa"},
    "chair": {"en": "under the chair", "fr": "sous la chaise", "de": "unter dem Stuhl", "es": "debajo de la silla"},
    "kitchen": {"en": "in the kitchen", "fr": "dans la cuisine", "de": "in der Küche", "es": "en la cocina"},
    "door": {"en": "next to the door", "fr": "à côté de la porte", "de": "neben der Tür", "es": "junto a la puerta"},
    "shelf": {"en": "on the shelf", "fr": "sur l'étagère", "de": "auf dem Regal", "es": "en el estante"},
    "bed": {"en": "under the bed", "fr": "sous le lit", "de": "unter dem Bett", "es": "debajo de la cama"},
    "garden": {"en": "in the garden", "fr": "dans le jardin", "de": "im Garten", "es": "en el jardín"},
}

# Counts and clock hours use 2..12 (1 needs singular agreement, and "a la una" / "une heure").
NUMBERS: dict[str, tuple[str, ...]] = {
    "en": ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
           "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
           "twenty", "twenty-one", "twenty-two", "twenty-three", "twenty-four"),
    "fr": ("zéro", "un", "deux", "trois", "quatre", "cinq", "six", "sept", "huit", "neuf", "dix", "onze", "douze"),
    "de": ("null", "eins", "zwei", "drei", "vier", "fünf", "sechs", "sieben", "acht", "neun", "zehn", "elf", "zwölf"),
    "es": ("cero", "uno", "dos", "tres", "cuatro", "cinco", "seis", "siete", "ocho", "nueve", "diez", "once", "doce"),
}

DAYS: dict[str, tuple[str, ...]] = {
    "en": ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"),
    "fr": ("lundi", "mardi", "mercredi", "jeudi", "vendredi", "samedi", "dimanche"),
    "de": ("Montag", "Dienstag", "Mittwoch", "Donnerstag", "Freitag", "Samstag", "Sonntag"),
    "es": ("lunes", "martes", "miércoles", "jueves", "viernes", "sábado", "domingo"),
}

MONTHS: dict[str, tuple[str, ...]] = {
    "en": ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"),
    "fr": ("janvier", "février", "mars", "avril", "mai", "juin", "juillet", "août", "septembre", "octobre",
           "novembre", "décembre"),
    "de": ("Januar", "Februar", "März", "April", "Mai", "Juni", "Juli", "August", "September", "Oktober",
           "November", "Dezember"),
    "es": ("enero", "febrero", "marzo", "abril", "mayo", "junio", "julio", "agosto", "septiembre", "octubre",
           "noviembre", "diciembre"),
}

# Everyday first names: ASR, translation and dialog sentences.
COMMON_NAMES = ("Anna", "Paul", "Maria", "Thomas", "Laura", "David", "Sophie", "Martin", "Elena", "Lucas",
                "Julia", "Daniel")
# Rare names for contextual biasing; the speech synthesiser says them, the prompt spells them.
BIASING_NAMES = ("Xiomara", "Thaddeus", "Oluwaseun", "Siobhan", "Aurelio", "Zbigniew", "Ingeborg", "Niamh",
                 "Cuauhtemoc", "Yevgeny", "Leocadia", "Phineas", "Saoirse", "Ignatius", "Wilhelmina",
                 "Bartholomew", "Eustace", "Perpetua", "Radomir", "Ottoline", "Caspian", "Isidora", "Fenella",
                 "Lysander")
# Held out: never in a training prompt or transcript (zero-shot biasing).
UNSEEN_BIASING_NAMES = ("Thelonious", "Ximena", "Aloysius", "Grainne", "Evander", "Bronislava", "Peregrine",
                        "Svetozar", "Clotilde", "Mstislav", "Ptolemy", "Eluned")

ARTICLES = {"fr": {"m": "le", "f": "la"}, "de": {"m": "der", "f": "die", "n": "das"}, "es": {"m": "el", "f": "la"}}


# --------------------------------------------------------------------------------------------
# Meanings
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Location:
    """'The red cup is on the table.'"""
    colour: str
    obj: str
    place: str


@dataclasses.dataclass(frozen=True)
class Count:
    """'I see three red cups.' or, with a second group, '... and two blue books.'"""
    items: tuple[tuple[int, str, str], ...]  # (number, colour, object) per group


@dataclasses.dataclass(frozen=True)
class Appointment:
    """'The meeting is on Monday at three o'clock.'"""
    event: str
    day: int  # 0 = Monday
    hour: int  # 2..12


@dataclasses.dataclass(frozen=True)
class Birthday:
    """'My birthday is in May.'"""
    month: int  # 0 = January


@dataclasses.dataclass(frozen=True)
class Code:
    """'The code is four seven two.'"""
    digits: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Introduction:
    """'My name is Anna.'"""
    name: str


Meaning = Union[Location, Count, Appointment, Birthday, Code, Introduction]
STATEMENT_KINDS = ("location", "count", "appointment", "birthday", "code", "introduction")


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _fr_colour(colour: str, gender: str, plural: bool) -> str:
    return COLOURS[colour][1][(2 if plural else 0) + (gender == "f")]


def _es_colour(colour: str, gender: str, plural: bool) -> str:
    return COLOURS[colour][3][(2 if plural else 0) + (gender == "f")]


def _noun_phrase(colour: str, noun: Noun, lang: str) -> str:
    """The definite singular noun phrase: 'the red cup', 'la tasse rouge', 'die rote Tasse'."""
    if lang == "en":
        return f"the {COLOURS[colour][0]} {noun.en[0]}"
    if lang == "fr":
        g, sg, _ = noun.fr
        return f"{ARTICLES['fr'][g]} {sg} {_fr_colour(colour, g, False)}"
    if lang == "de":
        g, sg, _ = noun.de
        return f"{ARTICLES['de'][g]} {COLOURS[colour][2]}e {sg}"
    g, sg, _ = noun.es
    return f"{ARTICLES['es'][g]} {sg} {_es_colour(colour, g, False)}"


def _counted_group(n: int, colour: str, noun: Noun, lang: str) -> str:
    """'three red cups', 'trois tasses rouges', 'drei rote Tassen', 'tres tazas rojas'."""
    number = NUMBERS[lang][n]
    if lang == "en":
        return f"{number} {COLOURS[colour][0]} {noun.en[1]}"
    if lang == "fr":
        g, _, pl = noun.fr
        return f"{number} {pl} {_fr_colour(colour, g, True)}"
    if lang == "de":
        return f"{number} {COLOURS[colour][2]}e {noun.de[2]}"
    g, _, pl = noun.es
    return f"{number} {pl} {_es_colour(colour, g, True)}"


_AND = {"en": "and", "fr": "et", "de": "und", "es": "y"}


def render(meaning: Meaning, lang: str) -> str:
    """The sentence for ``meaning`` in ``lang`` (capitalised, with a full stop)."""
    if lang not in LANGUAGES:
        raise ValueError(f"unknown language {lang!r}; expected one of {LANGUAGES}")
    if isinstance(meaning, Location):
        np_ = _noun_phrase(meaning.colour, OBJECTS[meaning.obj], lang)
        verb = {"en": "is", "fr": "est", "de": "ist", "es": "está"}[lang]
        return f"{_cap(np_)} {verb} {LOCATIONS[meaning.place][lang]}."
    if isinstance(meaning, Count):
        groups = [_counted_group(n, c, OBJECTS[o], lang) for n, c, o in meaning.items]
        said = f" {_AND[lang]} ".join(groups)
        return {"en": f"I see {said}.", "fr": f"Je vois {said}.", "de": f"Ich sehe {said}.", "es": f"Veo {said}."}[lang]
    if isinstance(meaning, Appointment):
        noun = EVENTS[meaning.event]
        day, hour = DAYS[lang][meaning.day], NUMBERS[lang][meaning.hour]
        if lang == "en":
            return f"The {noun.en[0]} is on {day} at {hour} o'clock."
        if lang == "fr":
            return f"{_cap(ARTICLES['fr'][noun.fr[0]])} {noun.fr[1]} est {day} à {hour} heures."
        if lang == "de":
            return f"{_cap(ARTICLES['de'][noun.de[0]])} {noun.de[1]} ist am {day} um {hour} Uhr."
        return f"{_cap(ARTICLES['es'][noun.es[0]])} {noun.es[1]} es el {day} a las {hour}."
    if isinstance(meaning, Birthday):
        month = MONTHS[lang][meaning.month]
        return {"en": f"My birthday is in {month}.", "fr": f"Mon anniversaire est en {month}.",
                "de": f"Mein Geburtstag ist im {month}.", "es": f"Mi cumpleaños es en {month}."}[lang]
    if isinstance(meaning, Code):
        digits = " ".join(NUMBERS[lang][d] for d in meaning.digits)
        return {"en": f"The code is {digits}.", "fr": f"Le code est {digits}.", "de": f"Der Code ist {digits}.",
                "es": f"El código es {digits}."}[lang]
    if isinstance(meaning, Introduction):
        return {"en": f"My name is {meaning.name}.", "fr": f"Je m'appelle {meaning.name}.",
                "de": f"Ich heiße {meaning.name}.", "es": f"Me llamo {meaning.name}."}[lang]
    raise TypeError(f"not a meaning: {meaning!r}")


# --------------------------------------------------------------------------------------------
# Sampling meanings
# --------------------------------------------------------------------------------------------
def _pick(rng: np.random.Generator, options):
    options = list(options)
    return options[int(rng.integers(len(options)))]


def sample_meaning(rng: np.random.Generator, kind: str | None = None) -> Meaning:
    """A random meaning of ``kind`` (one of STATEMENT_KINDS; random if None)."""
    kind = kind or _pick(rng, STATEMENT_KINDS)
    if kind == "location":
        return Location(_pick(rng, COLOURS), _pick(rng, OBJECTS), _pick(rng, LOCATIONS))
    if kind == "count":
        return Count(((int(rng.integers(2, 13)), _pick(rng, COLOURS), _pick(rng, OBJECTS)),))
    if kind == "count2":
        first, second = rng.choice(sorted(OBJECTS), size=2, replace=False)
        return Count(((int(rng.integers(2, 13)), _pick(rng, COLOURS), str(first)),
                      (int(rng.integers(2, 13)), _pick(rng, COLOURS), str(second))))
    if kind == "appointment":
        return Appointment(_pick(rng, EVENTS), int(rng.integers(7)), int(rng.integers(2, 13)))
    if kind == "birthday":
        return Birthday(int(rng.integers(12)))
    if kind == "code":
        return Code(tuple(int(d) for d in rng.integers(0, 10, size=int(rng.integers(3, 5)))))
    if kind == "introduction":
        return Introduction(_pick(rng, COMMON_NAMES))
    raise ValueError(f"unknown meaning kind {kind!r}")


# --------------------------------------------------------------------------------------------
# Questions, answers and replies about a meaning (English speech)
# --------------------------------------------------------------------------------------------
def _en_counted(n: int, noun: Noun) -> str:
    return f"{NUMBERS['en'][n]} {noun.en[1]}"


def question_answer(meaning: Meaning, rng: np.random.Generator) -> tuple[str, str]:
    """A training question about ``meaning`` and its exact English answer."""
    if isinstance(meaning, Location):
        obj = OBJECTS[meaning.obj].en[0]
        return _pick(rng, [
            (f"What colour is the {obj}?", COLOURS[meaning.colour][0]),
            (f"Where is the {obj}?", LOCATIONS[meaning.place]["en"]),
            (f"Which object is {LOCATIONS[meaning.place]['en']}?", f"the {COLOURS[meaning.colour][0]} {obj}"),
        ])
    if isinstance(meaning, Appointment):
        event = EVENTS[meaning.event].en[0]
        return _pick(rng, [
            (f"On which day is the {event}?", DAYS["en"][meaning.day]),
            (f"At what time is the {event}?", f"at {NUMBERS['en'][meaning.hour]} o'clock"),
        ])
    if isinstance(meaning, Birthday):
        return "In which month is the birthday?", MONTHS["en"][meaning.month]
    if isinstance(meaning, Code):
        return _pick(rng, [
            ("What is the first digit of the code?", NUMBERS["en"][meaning.digits[0]]),
            ("How many digits does the code have?", NUMBERS["en"][len(meaning.digits)]),
        ])
    if isinstance(meaning, Introduction):
        return "What is the speaker's name?", meaning.name
    raise ValueError(f"no question for {meaning!r}")


def count_question_answer(meaning: Count, rng: np.random.Generator) -> tuple[str, str]:
    """Counting / extraction over a two-group Count: 'How many cups were mentioned?' -> 'three'."""
    (n1, _, o1), (n2, _, o2) = meaning.items
    first, second = OBJECTS[o1], OBJECTS[o2]
    which = int(rng.integers(2))
    n, noun = ((n1, first), (n2, second))[which]
    return _pick(rng, [
        (f"How many {noun.en[1]} were mentioned?", NUMBERS["en"][n]),
        ("How many objects were mentioned in total?", NUMBERS["en"][n1 + n2]),
        ("List the objects that were mentioned.", f"{first.en[1]} and {second.en[1]}"),
        ("Repeat only the numbers that were said.", f"{NUMBERS['en'][n1]} and {NUMBERS['en'][n2]}"),
    ])


# Things a user might say in a dialog turn that are not statements about the world.
SMALL_TALK: dict[str, str] = {
    "Good morning.": "Good morning! How can I help you?",
    "Good evening.": "Good evening! How can I help you?",
    "How are you?": "I am fine, thank you.",
    "Thank you very much.": "You are welcome.",
    "Goodbye.": "Goodbye, see you soon.",
}


def dialog_reply(meaning: Meaning | str) -> str:
    """The deterministic reply to a dialog turn (a meaning, or a SMALL_TALK phrase)."""
    if isinstance(meaning, str):
        return SMALL_TALK[meaning]
    if isinstance(meaning, Introduction):
        return f"Nice to meet you, {meaning.name}."
    if isinstance(meaning, Location):
        return f"Thank you, I will look for the {COLOURS[meaning.colour][0]} {OBJECTS[meaning.obj].en[0]}."
    if isinstance(meaning, Appointment):
        return (f"Okay, see you on {DAYS['en'][meaning.day]} at {NUMBERS['en'][meaning.hour]} o'clock "
                f"for the {EVENTS[meaning.event].en[0]}.")
    if isinstance(meaning, Birthday):
        return f"I will remember that your birthday is in {MONTHS['en'][meaning.month]}."
    if isinstance(meaning, Count):
        groups = " and ".join(_en_counted(n, OBJECTS[o]) for n, _, o in meaning.items)
        return f"Okay, {groups}."
    if isinstance(meaning, Code):
        return "Thank you, I have written down the code."
    raise ValueError(f"no reply for {meaning!r}")


def french_answer(meaning: Meaning, rng: np.random.Generator) -> tuple[str, str]:
    """Zero-shot: a question answered in French ('Answer in French: ...')."""
    if isinstance(meaning, Location):
        noun = OBJECTS[meaning.obj]
        return _pick(rng, [
            (f"what colour is the {noun.en[0]}?", _fr_colour(meaning.colour, noun.fr[0], False)),
            (f"where is the {noun.en[0]}?", LOCATIONS[meaning.place]["fr"]),
        ])
    if isinstance(meaning, Appointment):
        return f"on which day is the {EVENTS[meaning.event].en[0]}?", DAYS["fr"][meaning.day]
    if isinstance(meaning, Birthday):
        return "in which month is the birthday?", MONTHS["fr"][meaning.month]
    raise ValueError(f"no French question for {meaning!r}")


def mentioned_colours(meaning: Meaning) -> list[str]:
    if isinstance(meaning, Location):
        return [COLOURS[meaning.colour][0]]
    if isinstance(meaning, Count):
        return [COLOURS[c][0] for _, c, _ in meaning.items]
    return []


BIASING_TEMPLATES = (
    "Please send the report to {name}.",
    "{name} will arrive tomorrow morning.",
    "I had lunch with {name} yesterday.",
    "Call {name} after the meeting.",
    "The book was written by {name}.",
)


def lexicon_lines() -> list[str]:
    """Every word of the grammar (all languages), for training a vocabulary that covers them."""
    lines: list[str] = []
    for noun in list(OBJECTS.values()) + list(EVENTS.values()):
        lines += [" ".join(noun.en), " ".join(noun.fr[1:]), " ".join(noun.de[1:]), " ".join(noun.es[1:])]
    for en, fr, de, es in COLOURS.values():
        lines += [en, " ".join(fr), f"{de}e", " ".join(es)]
    for loc in LOCATIONS.values():
        lines += list(loc.values())
    for table in (NUMBERS, DAYS, MONTHS):
        lines += [" ".join(words) for words in table.values()]
    lines += [" ".join(COMMON_NAMES), " ".join(BIASING_NAMES)]
    lines += list(SMALL_TALK) + list(SMALL_TALK.values())
    return lines

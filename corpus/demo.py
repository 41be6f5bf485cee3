"""Seeded German->English demo corpus generated from a small bilingual grammar.

The grammar covers noun genders with matching articles, nominative and
accusative case, adjective endings, plurals, numbers, personal pronouns with
verb agreement, modal verbs, negation, verb-second main clauses (also after a
fronted time expression), questions and verb-final subordinate clauses.  The
English side is a deterministic function of the German side, so a small
Transformer can learn to translate it almost perfectly.

``write_demo_corpus`` writes the corpus in the raw IWSLT layout
(``train.tags.de-en.*`` plus ``IWSLT16.TED.tst201[34].de-en.*.xml``) so the
same reader handles the demo and the real data.

Usage: python -m corpus.demo --out data/demo [--seed 1234 --n_train 20000 --n_dev 1000 --n_test 1000]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from xml.sax.saxutils import escape

# Bump when the grammar changes so cached corpora are regenerated.
GENERATOR_VERSION = 1
STAMP_FILE = "demo_corpus.json"
TRAIN_NAME = "train.tags.de-en.{lang}"
SET_NAME = "IWSLT16.TED.{set}.de-en.{lang}.xml"
DEV_SET, TEST_SET = "tst2013", "tst2014"
LINES_PER_TALK = 500

# ---------------------------------------------------------------------------
# Lexicon.  Nouns: "gender German[/accusative] plural english[/plural]".
# ---------------------------------------------------------------------------

ANIMATE_NOUNS = """
m Mann Männer man/men
f Frau Frauen woman/women
n Kind Kinder child/children
m Junge/Jungen Jungen boy
n Mädchen Mädchen girl
m Hund Hunde dog
f Katze Katzen cat
n Pferd Pferde horse
m Vogel Vögel bird
f Maus Mäuse mouse/mice
m Lehrer Lehrer teacher
m Arzt Ärzte doctor
m Koch Köche cook
m Bauer/Bauern Bauern farmer
m Student/Studenten Studenten student
m Nachbar/Nachbarn Nachbarn neighbor
m Freund Freunde friend
f Freundin Freundinnen girlfriend
m Bruder Brüder brother
f Schwester Schwestern sister
m Vater Väter father
f Mutter Mütter mother
m Sohn Söhne son
f Tochter Töchter daughter
m Onkel Onkel uncle
f Tante Tanten aunt
m Großvater Großväter grandfather
f Großmutter Großmütter grandmother
m König Könige king
f Königin Königinnen queen
m Prinz/Prinzen Prinzen prince
f Prinzessin Prinzessinnen princess
m Polizist/Polizisten Polizisten policeman/policemen
m Fahrer Fahrer driver
m Kellner Kellner waiter
f Kellnerin Kellnerinnen waitress
m Bäcker Bäcker baker
m Maler Maler painter
m Sänger Sänger singer
m Affe/Affen Affen monkey
m Löwe/Löwen Löwen lion
m Bär/Bären Bären bear
m Elefant/Elefanten Elefanten elephant
m Fisch Fische fish/fish
f Kuh Kühe cow
n Schaf Schafe sheep/sheep
n Schwein Schweine pig
f Ente Enten duck
m Hase/Hasen Hasen hare
m Fuchs Füchse fox
m Wolf Wölfe wolf/wolves
f Ziege Ziegen goat
m Tiger Tiger tiger
m Pilot/Piloten Piloten pilot
m Kunde/Kunden Kunden customer
m Gast Gäste guest
m Soldat/Soldaten Soldaten soldier
m Richter Richter judge
m Schüler Schüler pupil
m Künstler Künstler artist
m Ingenieur Ingenieure engineer
m Professor Professoren professor
"""

THING_NOUNS = """
m Apfel Äpfel apple
f Birne Birnen pear
f Banane Bananen banana
n Brot Brote loaf/loaves
m Kuchen Kuchen cake
f Suppe Suppen soup
m Käse Käse cheese
n Ei Eier egg
f Tomate Tomaten tomato/tomatoes
f Kartoffel Kartoffeln potato/potatoes
f Zwiebel Zwiebeln onion
f Karotte Karotten carrot
m Salat Salate salad
f Wurst Würste sausage
f Pizza Pizzas pizza
m Keks Kekse cookie
f Flasche Flaschen bottle
n Glas Gläser glass
f Tasse Tassen cup
m Teller Teller plate
n Messer Messer knife/knives
f Gabel Gabeln fork
m Löffel Löffel spoon
m Topf Töpfe pot
n Buch Bücher book
f Zeitung Zeitungen newspaper
m Brief Briefe letter
n Heft Hefte notebook
m Stift Stifte pen
n Bild Bilder picture
f Karte Karten map
n Foto Fotos photo
n Lied Lieder song
f Geschichte Geschichten story
n Auto Autos car
m Bus Busse bus
n Fahrrad Fahrräder bicycle
m Zug Züge train
n Schiff Schiffe ship
n Boot Boote boat
n Flugzeug Flugzeuge airplane
n Haus Häuser house
f Wohnung Wohnungen apartment
n Zimmer Zimmer room
f Tür Türen door
n Fenster Fenster window
m Tisch Tische table
m Stuhl Stühle chair
n Bett Betten bed
f Lampe Lampen lamp
m Schrank Schränke cupboard
n Sofa Sofas sofa
m Teppich Teppiche carpet
f Uhr Uhren clock
m Schlüssel Schlüssel key
f Tasche Taschen bag
m Koffer Koffer suitcase
m Hut Hüte hat
f Jacke Jacken jacket
n Hemd Hemden shirt
m Rock Röcke skirt
m Schuh Schuhe shoe
m Mantel Mäntel coat
n Kleid Kleider dress
m Schal Schals scarf/scarves
m Ring Ringe ring
f Kette Ketten necklace
m Ball Bälle ball
n Spiel Spiele game
n Spielzeug Spielzeuge toy
f Puppe Puppen doll
m Computer Computer computer
n Telefon Telefone telephone
m Fernseher Fernseher television
n Radio Radios radio
f Kamera Kameras camera
m Garten Gärten garden
m Baum Bäume tree
f Blume Blumen flower
f Rose Rosen rose
m Stein Steine stone
m Berg Berge mountain
m Fluss Flüsse river
m See Seen lake
f Brücke Brücken bridge
f Straße Straßen street
f Kirche Kirchen church
f Schule Schulen school
m Bahnhof Bahnhöfe station
n Museum Museen museum
f Stadt Städte city
n Dorf Dörfer village
n Schloss Schlösser castle
n Geschenk Geschenke gift
n Paket Pakete package
f Kiste Kisten box
m Korb Körbe basket
m Eimer Eimer bucket
m Hammer Hämmer hammer
f Säge Sägen saw
m Regenschirm Regenschirme umbrella
m Spiegel Spiegel mirror
f Kerze Kerzen candle
n Kissen Kissen pillow
f Decke Decken blanket
f Gitarre Gitarren guitar
n Klavier Klaviere piano
f Geige Geigen violin
f Trommel Trommeln drum
n Rezept Rezepte recipe
f Rechnung Rechnungen bill
n Ticket Tickets ticket
m Pass Pässe passport
f Münze Münzen coin
m Zettel Zettel note
f Nachricht Nachrichten message
f Frage Fragen question
f Antwort Antworten answer
f Idee Ideen idea
m Plan Pläne plan
m Film Filme film
n Konzert Konzerte concert
n Fest Feste party
m Kaffee Kaffees coffee
m Tee Tees tea
n Bier Biere beer
m Saft Säfte juice
m Wein Weine wine
m Motor Motoren engine
n Werkzeug Werkzeuge tool
f Leiter Leitern ladder
m Nagel Nägel nail
n Seil Seile rope
n Zelt Zelte tent
n Netz Netze net
m Helm Helme helmet
m Rucksack Rucksäcke backpack
m Kalender Kalender calendar
m Umschlag Umschläge envelope
f Insel Inseln island
m Ofen Öfen oven
"""

# "German[/declension stem] english"
ADJECTIVES = """
rot red|blau blue|grün green|gelb yellow|schwarz black|weiß white|braun brown
grau gray|groß big|klein small|alt old|neu new|jung young|schön beautiful
hässlich ugly|schnell fast|langsam slow|billig cheap|teuer/teur expensive
warm warm|kalt cold|heiß hot|laut loud|leise quiet|klug clever|dumm stupid
müde tired|glücklich happy|traurig sad|freundlich friendly|stark strong
schwach weak|reich rich|arm poor|hungrig hungry|durstig thirsty|lustig funny
ernst serious|hell bright|dunkel/dunkl dark|sauber clean|schmutzig dirty
leer empty|voll full|lang long|kurz short|dick fat|dünn thin|weich soft
hart hard|süß sweet|sauer/saur sour|frisch fresh|modern modern
wichtig important|einfach simple|schwierig difficult|ruhig calm|wild wild
nett nice|berühmt famous|fremd foreign|seltsam strange|bequem comfortable
gefährlich dangerous|sicher safe|hoch/hoh high|krank sick|gesund healthy
nass wet|trocken dry|schwer heavy|leicht light|tief deep|breit wide
eng narrow|fleißig hardworking|faul lazy|mutig brave|neugierig curious
höflich polite|böse angry|froh glad|stolz proud|bunt colorful|rund round
scharf sharp
"""

# "infinitive[/du form/er form] = english" (du/er only for stem changes).
TRANSITIVE_VERBS = """
kaufen = buy|verkaufen = sell|sehen/siehst/sieht = see|essen/isst/isst = eat
trinken = drink|lesen/liest/liest = read|schreiben = write|finden = find
suchen = look for|brauchen = need|haben/hast/hat = have|lieben = love
kennen = know|malen = paint|zeichnen/zeichnest/zeichnet = draw|bauen = build
kochen = cook|waschen/wäschst/wäscht = wash|tragen/trägst/trägt = carry
nehmen/nimmst/nimmt = take|öffnen/öffnest/öffnet = open|schließen = close
besuchen = visit|fragen = ask|hören = hear|bringen = bring|holen = fetch
treffen/triffst/trifft = meet|fangen/fängst/fängt = catch
halten/hältst/hält = hold|werfen/wirfst/wirft = throw
vergessen/vergisst/vergisst = forget|putzen = clean|reparieren = repair
bestellen = order|zählen = count|fotografieren = photograph
beobachten = watch|rufen = call|verstehen = understand|gewinnen = win
verlieren = lose|wählen = choose|mieten = rent|teilen = share|zeigen = show
ziehen = pull|schieben = push|backen = bake|vermissen = miss|benutzen = use
schneiden = cut|füllen = fill|heben = lift|erkennen = recognize
bezahlen = pay for|erreichen = reach|verstecken = hide|retten = save
pflanzen = plant|besitzen = own|begrüßen = greet|umarmen = hug|küssen = kiss
"""

INTRANSITIVE_VERBS = """
schlafen/schläfst/schläft = sleep|laufen/läufst/läuft = walk|lachen = laugh
arbeiten = work|singen = sing|tanzen = dance|schwimmen = swim|warten = wait
spielen = play|weinen = cry|rennen = run|kommen = come|gehen = go
reisen = travel|schreien = scream|springen = jump|fliegen = fly|sitzen = sit
stehen = stand|bleiben = stay|träumen = dream|bellen = bark
fahren/fährst/fährt = drive|lernen = learn
"""

# Verbs that take a "dass" clause.
REPORT_VERBS = """
sagen = say|glauben = believe|denken = think|hoffen = hope
wissen/weißt/weiß = know
"""

# Person order: ich du er/sie/es wir ihr sie/Sie.
FULL_FORMS = {
    "wissen": "weiß weißt weiß wissen wisst wissen",
    "sein": "bin bist ist sind seid sind",
    "können": "kann kannst kann können könnt können",
    "wollen": "will willst will wollen wollt wollen",
    "müssen": "muss musst muss müssen müsst müssen",
    "möchten": "möchte möchtest möchte möchten möchtet möchten",
    "sollen": "soll sollst soll sollen sollt sollen",
    "dürfen": "darf darfst darf dürfen dürft dürfen",
}

# German modal -> (English auxiliary or None for "want", words after it).
MODALS = {
    "können": ("can", ()),
    "wollen": (None, ("to",)),
    "müssen": ("must", ()),
    "möchten": ("would", ("like", "to")),
    "sollen": ("should", ()),
    "dürfen": ("may", ()),
}

TIME_ADVERBS = """
heute = today|morgen = tomorrow|jetzt = now|bald = soon|später = later
abends = in the evening|morgens = in the morning|nachts = at night
mittags = at noon|heute Abend = tonight|morgen früh = tomorrow morning
am Montag = on Monday|am Dienstag = on Tuesday|am Mittwoch = on Wednesday
am Donnerstag = on Thursday|am Freitag = on Friday|am Samstag = on Saturday
am Sonntag = on Sunday|im Sommer = in summer|im Winter = in winter
im Frühling = in spring|im Herbst = in autumn|am Wochenende = on the weekend
jeden Tag = every day
"""

# Frequency adverbs; the first three may also start a sentence.
FREQUENCY_ADVERBS = """
oft = often|manchmal = sometimes|meistens = usually|immer = always
nie = never|selten = rarely
"""
FRONTABLE_FREQUENCY = 3

MANNER_ADVERBS = """
schnell = quickly|langsam = slowly|laut = loudly|leise = quietly|gut = well
schlecht = badly|ruhig = calmly|fröhlich = happily|vorsichtig = carefully
allein = alone|zusammen = together|draußen = outside|drinnen = inside
hier = here|dort = there|zu Hause = at home
"""

NAMES = """
Anna Peter Maria Thomas Julia Michael Laura Stefan Lena Markus Sarah Jonas
Lisa Felix Emma Paul Sophie Lukas Hannah David Clara Tobias Nina Daniel Eva
Jan Simon Martin Greta Oskar
"""

NUMBERS = """
zwei = two|drei = three|vier = four|fünf = five|sechs = six|sieben = seven
acht = eight|neun = nine|zehn = ten|elf = eleven|zwölf = twelve
"""

SUBORDINATORS = """
weil = because|obwohl = although|wenn = if|während = while|bevor = before
sobald = as soon as
"""
COORDINATORS = "und = and|aber = but|oder = or|denn = for"
QUESTION_WORDS = "warum = why|wo = where|wann = when"

# Subject pronouns: German, English, person index (0..5), may start a sentence.
SUBJECT_PRONOUNS = [
    ("ich", "I", 0, True),
    ("du", "you", 1, True),
    ("er", "he", 2, True),
    ("sie", "she", 2, True),
    ("es", "it", 2, True),
    ("wir", "we", 3, True),
    ("ihr", "you", 4, True),
    ("sie", "they", 5, False),  # "Sie ..." at the start would read as formal
    ("Sie", "you", 5, False),
]
# Object pronouns with the person they must not share with the subject.
OBJECT_PRONOUNS = [
    ("mich", "me", 0),
    ("dich", "you", 1),
    ("ihn", "him", 2),
    ("uns", "us", 3),
    ("euch", "you", 4),
]

# Determiners.  "ein" type: ending table of ein; "der" type: of der/dieser.
EIN_ENDINGS = {("m", "nom"): "", ("f", "nom"): "e", ("n", "nom"): "",
               ("m", "acc"): "en", ("f", "acc"): "e", ("n", "acc"): ""}
DER_FORMS = {("m", "nom"): "der", ("f", "nom"): "die", ("n", "nom"): "das",
             ("m", "acc"): "den", ("f", "acc"): "die", ("n", "acc"): "das"}
DIESER_ENDINGS = {("m", "nom"): "er", ("f", "nom"): "e", ("n", "nom"): "es",
                  ("m", "acc"): "en", ("f", "acc"): "e", ("n", "acc"): "es"}
POSSESSIVES = [("mein", "my"), ("dein", "your"), ("unser", "our")]
POSSESSIVE_STEMS = {stem for stem, _ in POSSESSIVES}


def _entries(table: str) -> list[tuple[str, str]]:
    """Parse "german = english|..." tables into (german, english) pairs."""
    pairs = []
    for item in table.replace("\n", "|").split("|"):
        if item.strip():
            german, english = item.split("=")
            pairs.append((german.strip(), english.strip()))
    return pairs


@dataclass(frozen=True)
class Noun:
    """A noun with gender, German forms and English forms."""

    gender: str
    nominative: str
    accusative: str
    plural: str
    english: str
    english_plural: str


@dataclass(frozen=True)
class Verb:
    """A verb with its six German present forms and English base form."""

    infinitive: str
    forms: tuple[str, ...]
    english: str


def _english_plural(word: str) -> str:
    if word.endswith(("s", "x", "ch", "sh", "z")):
        return word + "es"
    if word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def _parse_nouns(table: str) -> list[Noun]:
    nouns = []
    for line in table.strip().splitlines():
        gender, german, plural, english = line.split()
        nominative, _, accusative = german.partition("/")
        singular_en, _, plural_en = english.partition("/")
        nouns.append(Noun(gender, nominative, accusative or nominative, plural,
                          singular_en, plural_en or _english_plural(singular_en)))
    return nouns


def _needs_e_insertion(stem: str) -> bool:
    return stem.endswith(("d", "t", "chn", "ffn", "gn"))


def _conjugate(infinitive: str, du: str = "", er: str = "") -> tuple[str, ...]:
    """Present-tense forms for ich, du, er, wir, ihr, sie of a regular verb."""
    if infinitive in FULL_FORMS:
        return tuple(FULL_FORMS[infinitive].split())
    stem = infinitive[:-2]
    if _needs_e_insertion(stem):
        regular_du, regular_t = stem + "est", stem + "et"
    elif stem.endswith(("s", "ß", "z", "x")):
        regular_du, regular_t = stem + "t", stem + "t"
    else:
        regular_du, regular_t = stem + "st", stem + "t"
    return (stem + "e", du or regular_du, er or regular_t, infinitive,
            regular_t, infinitive)


def _parse_verbs(table: str) -> list[Verb]:
    verbs = []
    for german, english in _entries(table):
        infinitive, *changed = german.split("/")
        verbs.append(Verb(infinitive, _conjugate(infinitive, *changed), english))
    return verbs


def _parse_adjectives(table: str) -> list[tuple[str, str, str]]:
    """(predicative, declension stem, english) triples."""
    adjectives = []
    for item in table.replace("\n", "|").split("|"):
        if item.strip():
            german, english = item.split()
            predicative, _, stem = german.partition("/")
            stem = stem or predicative.removesuffix("e")
            adjectives.append((predicative, stem, english))
    return adjectives


@dataclass(frozen=True)
class Lexicon:
    """The parsed lexicon tables (tuples, so the shared cached value cannot be changed)."""

    animate: tuple[Noun, ...]
    things: tuple[Noun, ...]
    all_nouns: tuple[Noun, ...]
    adjectives: tuple[tuple[str, str, str], ...]
    transitive: tuple[Verb, ...]
    intransitive: tuple[Verb, ...]
    reporting: tuple[Verb, ...]
    sein: Verb  # compared by identity: `clause.verb is lexicon().sein`
    ask: Verb
    modal_verbs: tuple[Verb, ...]
    times: tuple[tuple[str, str], ...]
    frequencies: tuple[tuple[str, str], ...]
    manners: tuple[tuple[str, str], ...]
    number_words: tuple[tuple[str, str], ...]
    subordinating: tuple[tuple[str, str], ...]
    coordinating: tuple[tuple[str, str], ...]
    wh_words: tuple[tuple[str, str], ...]
    names: tuple[str, ...]


@functools.cache
def lexicon() -> Lexicon:
    """The lexicon tables above, parsed on first use (importing this module parses nothing)."""
    animate = tuple(_parse_nouns(ANIMATE_NOUNS))
    things = tuple(_parse_nouns(THING_NOUNS))
    transitive = tuple(_parse_verbs(TRANSITIVE_VERBS))
    return Lexicon(
        animate=animate,
        things=things,
        all_nouns=animate + things,
        adjectives=tuple(_parse_adjectives(ADJECTIVES)),
        transitive=transitive,
        intransitive=tuple(_parse_verbs(INTRANSITIVE_VERBS)),
        reporting=tuple(_parse_verbs(REPORT_VERBS)),
        sein=Verb("sein", _conjugate("sein"), "be"),
        ask=next(verb for verb in transitive if verb.infinitive == "fragen"),
        modal_verbs=tuple(Verb(name, _conjugate(name), name) for name in MODALS),
        times=tuple(_entries(TIME_ADVERBS)),
        frequencies=tuple(_entries(FREQUENCY_ADVERBS)),
        manners=tuple(_entries(MANNER_ADVERBS)),
        number_words=tuple(_entries(NUMBERS)),
        subordinating=tuple(_entries(SUBORDINATORS)),
        coordinating=tuple(_entries(COORDINATORS)),
        wh_words=tuple(_entries(QUESTION_WORDS)),
        names=tuple(NAMES.split()),
    )


def lexicon_size() -> tuple[int, int]:
    """Number of distinct German and English lexicon entries (lemmas)."""
    lex = lexicon()
    pairs: list[tuple[str, str]] = []
    pairs += [(n.nominative, n.english) for n in lex.all_nouns]
    pairs += [(a[0], a[2]) for a in lex.adjectives]
    pairs += [(v.infinitive, v.english) for v in lex.transitive + lex.intransitive + lex.reporting]
    pairs += [(m, MODALS[m][0] or "want") for m in MODALS] + [("sein", "be")]
    pairs += lex.times + lex.frequencies + lex.manners + lex.number_words
    pairs += lex.subordinating + lex.coordinating + lex.wh_words
    pairs += [("dass", "that"), ("ob", "whether")]
    pairs += [(p[0], p[1]) for p in SUBJECT_PRONOUNS] + [(p[0], p[1]) for p in OBJECT_PRONOUNS]
    pairs += [(name, name) for name in lex.names] + POSSESSIVES
    pairs += [("der", "the"), ("ein", "a"), ("kein", "no"), ("dieser", "this"),
              ("jeder", "every"), ("viele", "many"), ("einige", "some"),
              ("nicht", "not"), ("was", "what"), ("wer", "who")]
    return len({p[0] for p in pairs}), len({p[1] for p in pairs})


def finite_verb_forms() -> set[str]:
    """All conjugated German verb forms the grammar can produce."""
    lex = lexicon()
    verbs = lex.transitive + lex.intransitive + lex.reporting + lex.modal_verbs + (lex.sein,)
    return {form for verb in verbs for form in verb.forms}


# ---------------------------------------------------------------------------
# Phrases
# ---------------------------------------------------------------------------


@dataclass
class Phrase:
    """Aligned German and English words plus grammatical person (0..5)."""

    german: list[str]
    english: list[str]
    person: int = 2
    pronoun: bool = False
    can_start: bool = True
    definite: bool = True
    negative: bool = False


def _article_en(next_word: str) -> str:
    return "an" if next_word[0] in "aeiou" else "a"


def _adjective_ending(style: str, gender: str, case: str, plural: bool) -> str:
    """Adjective ending after a determiner of the given style."""
    if style == "weak":  # after der/dieser/jeder and any plural determiner word
        if plural or (gender == "m" and case == "acc"):
            return "en"
        return "e"
    if style == "strong_plural":  # after numbers, viele, einige, no article
        return "e"
    # mixed: after ein/kein/mein in the singular
    if gender == "m" and case == "acc":
        return "en"
    return {"m": "er", "f": "e", "n": "es"}[gender]


def _choose_determiner(rng: random.Random, plural: bool) -> tuple[str, str, str]:
    """(kind, German stem, English word) of a determiner."""
    if plural:
        options = [("der", "die", "the")] * 4 + [("dieser", "dies", "these")]
        options += [("ein", "kein", "no"), ("strong", "viele", "many"),
                    ("strong", "einige", "some"), ("strong", "", "")]
        options += [("ein", stem, english) for stem, english in POSSESSIVES]
        options += [("strong", g, e) for g, e in lexicon().number_words]
        return rng.choice(options)
    options = [("der", "der", "the")] * 4 + [("ein", "ein", "a")] * 3
    options += [("ein", "kein", "no"), ("dieser", "dies", "this"),
                ("dieser", "jed", "every")]
    options += [("ein", stem, english) for stem, english in POSSESSIVES]
    return rng.choice(options)


def _german_determiner(kind: str, stem: str, gender: str, case: str,
                       plural: bool) -> str:
    if not stem:
        return ""
    if kind == "strong":
        return stem
    if kind == "der":
        return "die" if plural else DER_FORMS[(gender, case)]
    if kind == "dieser":
        return stem + ("e" if plural else DIESER_ENDINGS[(gender, case)])
    return stem + ("e" if plural else EIN_ENDINGS[(gender, case)])


def noun_phrase(rng: random.Random, nouns: Sequence[Noun], case: str) -> Phrase:
    """A determiner (+ adjective) + noun phrase in nominative or accusative."""
    noun = rng.choice(nouns)
    plural = rng.random() < 0.3
    kind, stem, english_det = _choose_determiner(rng, plural)
    german_det = _german_determiner(kind, stem, noun.gender, case, plural)
    german = [german_det] if german_det else []
    english = [english_det] if english_det else []
    if rng.random() < 0.3:
        predicative, adj_stem, adj_en = rng.choice(lexicon().adjectives)
        style = "strong_plural" if kind == "strong" else (
            "weak" if kind in ("der", "dieser") or plural else "mixed")
        german.append(adj_stem + _adjective_ending(style, noun.gender, case, plural))
        english.append(adj_en)
    if plural:
        german.append(noun.plural)
        english.append(noun.english_plural)
    else:
        german.append(noun.accusative if case == "acc" else noun.nominative)
        english.append(noun.english)
    if english[0] == "a":
        english[0] = _article_en(english[1])
    definite = kind in ("der", "dieser") and stem != "jed" or stem in POSSESSIVE_STEMS
    return Phrase(german, english, 5 if plural else 2, definite=definite,
                  negative=stem == "kein")


def subject_phrase(rng: random.Random, nouns: Sequence[Noun]) -> Phrase:
    """Subject: pronoun, name or noun phrase in the nominative."""
    draw = rng.random()
    if draw < 0.25:
        german, english, person, can_start = rng.choice(SUBJECT_PRONOUNS)
        return Phrase([german], [english], person, pronoun=True, can_start=can_start)
    if draw < 0.4:
        name = rng.choice(lexicon().names)
        return Phrase([name], [name])
    return noun_phrase(rng, nouns, "nom")


def object_phrase(rng: random.Random, subject_person: int) -> Phrase:
    """Accusative object: pronoun, name or noun phrase."""
    draw = rng.random()
    if draw < 0.1:
        german, english, person = rng.choice(OBJECT_PRONOUNS)
        if person != subject_person:
            return Phrase([german], [english], person, pronoun=True)
    if draw < 0.2:
        name = rng.choice(lexicon().names)
        return Phrase([name], [name])
    return noun_phrase(rng, lexicon().all_nouns, "acc")


# ---------------------------------------------------------------------------
# Clauses
# ---------------------------------------------------------------------------


@dataclass
class Clause:
    """One clause before word order is decided."""

    subject: Phrase
    verb: Verb
    obj: Phrase | None = None
    adjective: tuple[str, str] | None = None  # predicate after "sein"
    modal: Verb | None = None
    negated: bool = False
    time: tuple[str, str] | None = None
    frequency: tuple[str, str] | None = None
    manner: tuple[str, str] | None = None


def sample_clause(rng: random.Random, kind: str = "") -> Clause:
    """Random clause; kind is "trans", "intr" or "cop" (random when empty)."""
    lex = lexicon()
    kind = kind or rng.choices(["trans", "intr", "cop"], [0.55, 0.27, 0.18])[0]
    if kind == "cop":
        subject = subject_phrase(rng, lex.all_nouns)
        predicative, _, english = rng.choice(lex.adjectives)
        clause = Clause(subject, lex.sein, adjective=(predicative, english))
    else:
        subject = subject_phrase(rng, lex.animate)
        verbs = lex.transitive if kind == "trans" else lex.intransitive
        clause = Clause(subject, rng.choice(verbs))
        if kind == "trans":
            clause.obj = object_phrase(rng, subject.person)
        elif rng.random() < 0.4:
            clause.manner = rng.choice(lex.manners)
        if rng.random() < 0.15:
            clause.modal = rng.choice(lex.modal_verbs)
    if rng.random() < 0.25:
        clause.time = rng.choice(lex.times)
    if rng.random() < 0.12 and not subject.negative and (clause.obj is None or clause.obj.definite):
        clause.negated = True
    elif rng.random() < 0.15:
        clause.frequency = rng.choice(lex.frequencies)
    return clause


def _finite(clause: Clause) -> str:
    return (clause.modal or clause.verb).forms[clause.subject.person]


def _middle_field(clause: Clause, with_time: bool = True) -> list[str]:
    """German words between the finite verb (or subject) and the verb end."""
    words: list[str] = []
    if clause.obj and clause.obj.pronoun:
        words += clause.obj.german
    if clause.time and with_time:
        words += clause.time[0].split()
    if clause.frequency:
        words.append(clause.frequency[0])
    if clause.obj and not clause.obj.pronoun:
        words += clause.obj.german
    if clause.negated:
        words.append("nicht")
    if clause.manner:
        words += clause.manner[0].split()
    if clause.adjective:
        words.append(clause.adjective[0])
    if clause.modal:
        words.append(clause.verb.infinitive)
    return words


def german_main(clause: Clause, front_time: bool = False) -> list[str]:
    """Verb-second main clause, optionally with the time expression first."""
    if front_time and clause.time:
        first = clause.time[0].split()
        return first + [_finite(clause)] + clause.subject.german + _middle_field(clause, False)
    return clause.subject.german + [_finite(clause)] + _middle_field(clause)


def german_subordinate(conjunction: str, clause: Clause) -> list[str]:
    """Verb-final subordinate clause introduced by a conjunction."""
    return [conjunction] + clause.subject.german + _middle_field(clause) + [_finite(clause)]


def _english_third(word: str) -> str:
    if word == "have":
        return "has"
    if word.endswith(("s", "x", "z", "ch", "sh", "o")):
        return word + "es"
    if word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def _agree(english_verb: str, person: int) -> list[str]:
    """English present-tense verb (first word inflected) for a person."""
    words = english_verb.split()
    if person == 2:
        words[0] = _english_third(words[0])
    return words


def _be(person: int) -> str:
    return {0: "am", 2: "is"}.get(person, "are")


def _english_head(clause: Clause, question: bool) -> tuple[list[str], list[str]]:
    """(auxiliary part, rest of the verb group) for an English clause.

    For questions the auxiliary part moves before the subject.
    """
    person, frequency = clause.subject.person, clause.frequency
    adverb = [frequency[1]] if frequency else []
    nots = ["not"] if clause.negated else []
    if clause.verb is lexicon().sein:
        return [_be(person)], adverb + nots
    if clause.modal and MODALS[clause.modal.infinitive][0]:
        aux, after = MODALS[clause.modal.infinitive]
        if clause.negated and aux == "can":
            return ["cannot"], list(after) + [clause.verb.english]
        return [aux], adverb + nots + list(after) + [clause.verb.english]
    lexical = "want" if clause.modal else clause.verb.english
    tail = ["to", clause.verb.english] if clause.modal else []
    if question or clause.negated:
        do = "does" if person == 2 else "do"
        return [do], adverb + nots + lexical.split() + tail
    return [], adverb + _agree(lexical, person) + tail


def _english_rest(clause: Clause, with_object: bool = True) -> list[str]:
    words: list[str] = []
    if clause.obj and with_object:
        words += clause.obj.english
    if clause.manner:
        words += clause.manner[1].split()
    if clause.adjective:
        words.append(clause.adjective[1])
    if clause.time:
        words += clause.time[1].split()
    return words


def english_statement(clause: Clause, front_time: bool = False) -> list[str]:
    """English declarative clause in subject-verb-object order."""
    aux, verb = _english_head(clause, question=False)
    words = clause.subject.english + aux + verb + _english_rest(clause)
    if front_time and clause.time:
        time = clause.time[1].split()
        return time + words[: len(words) - len(time)]
    return words


def english_question(clause: Clause, with_object: bool = True) -> list[str]:
    """English yes/no question order (auxiliary before the subject)."""
    aux, verb = _english_head(clause, question=True)
    return aux + clause.subject.english + verb + _english_rest(clause, with_object)


# ---------------------------------------------------------------------------
# Sentences
# ---------------------------------------------------------------------------


def _statement(rng: random.Random, clause: Clause) -> tuple[list[str], list[str]]:
    """Main clause; fronts a time expression when the subject cannot start."""
    lex = lexicon()
    if not clause.subject.can_start and not clause.time:
        clause.time = rng.choice(lex.times)
    front = clause.time is not None and (not clause.subject.can_start or rng.random() < 0.5)
    if not front and clause.frequency and rng.random() < 0.3 and \
            lex.frequencies.index(clause.frequency) < FRONTABLE_FREQUENCY:
        return _fronted_frequency(clause)
    return german_main(clause, front), english_statement(clause, front)


def _fronted_frequency(clause: Clause) -> tuple[list[str], list[str]]:
    """"Oft kauft der Mann ..." -> "Often the man buys ..."."""
    german_adverb, english_adverb = clause.frequency
    clause.frequency = None
    german = [german_adverb, _finite(clause)] + clause.subject.german + _middle_field(clause)
    english = [english_adverb] + english_statement(clause)
    return german, english


def _simple(rng: random.Random) -> tuple[list[str], list[str]]:
    return _statement(rng, sample_clause(rng))


def _with_subordinate(rng: random.Random) -> tuple[list[str], list[str]]:
    conjunction, english_conjunction = rng.choice(lexicon().subordinating)
    main, sub = sample_clause(rng), sample_clause(rng)
    sub_german = german_subordinate(conjunction, sub)
    sub_english = english_conjunction.split() + english_statement(sub)
    if rng.random() < 0.35:  # subordinate clause first, then verb-subject order
        german = sub_german + [","] + [_finite(main)] + main.subject.german + _middle_field(main)
        return german, sub_english + [","] + english_statement(main)
    german, english = _statement(rng, main)
    return german + [","] + sub_german, english + [","] + sub_english


def _reported(rng: random.Random) -> tuple[list[str], list[str]]:
    """"Die Frau sagt, dass ..." or "Der Mann fragt, ob ..."."""
    lex = lexicon()
    speaker = subject_phrase(rng, lex.animate)
    if rng.random() < 0.3:
        verb, conjunction, english_conjunction = lex.ask, "ob", "whether"
    else:
        verb, conjunction, english_conjunction = rng.choice(lex.reporting), "dass", "that"
    main = Clause(speaker, verb)
    sub = sample_clause(rng)
    german, english = _statement(rng, main)
    return (german + [",", *german_subordinate(conjunction, sub)],
            english + [english_conjunction] + english_statement(sub))


def _coordinated(rng: random.Random) -> tuple[list[str], list[str]]:
    conjunction, english_conjunction = rng.choice(lexicon().coordinating)
    first_german, first_english = _statement(rng, sample_clause(rng))
    second = sample_clause(rng)
    comma = [","] if conjunction in ("aber", "denn") else []
    german = first_german + comma + [conjunction] + german_main(second)
    english = first_english + comma + [english_conjunction] + english_statement(second)
    return german, english


def _question(rng: random.Random) -> tuple[list[str], list[str]]:
    """Yes/no or wh-question with verb-first order in German."""
    draw = rng.random()
    clause = sample_clause(rng, "trans" if draw < 0.3 else "")
    clause.negated = False
    if draw < 0.3:  # "Was kauft der Mann?"
        obj = clause.obj
        clause.obj = None
        german = ["was", _finite(clause)] + clause.subject.german + _middle_field(clause)
        clause.obj = obj
        return german, ["what"] + english_question(clause, with_object=False)
    if draw < 0.45:  # "Wer kauft den Apfel?"
        clause.subject = Phrase(["wer"], ["who"])
        return german_main(clause), english_statement(clause)
    german = [_finite(clause)] + clause.subject.german + _middle_field(clause)
    english = english_question(clause)
    if draw < 0.7:
        wh_german, wh_english = rng.choice(lexicon().wh_words)
        if wh_german == "wann":
            clause.time = None
        if wh_german == "wo":
            clause.manner = None
        german = [wh_german, _finite(clause)] + clause.subject.german + _middle_field(clause)
        english = [wh_english] + english_question(clause)
    return german, english


TEMPLATES = [(_simple, 0.32), (_with_subordinate, 0.28), (_reported, 0.14),
             (_coordinated, 0.1), (_question, 0.16)]


def _sentence(words: list[str], question: bool) -> str:
    text = " ".join(words).replace(" ,", ",")
    text = text[0].upper() + text[1:]
    return text + ("?" if question else ".")


def sample_pair(rng: random.Random) -> tuple[str, str]:
    """One random (German, English) sentence pair."""
    template = rng.choices([t for t, _ in TEMPLATES], [w for _, w in TEMPLATES])[0]
    german, english = template(rng)
    question = template is _question
    return _sentence(german, question), _sentence(english, question)


def generate_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    """n distinct (German, English) pairs; the same seed gives the same list."""
    rng = random.Random(seed)
    pairs: dict[str, str] = {}
    while len(pairs) < n:
        german, english = sample_pair(rng)
        pairs.setdefault(german, english)
    return list(pairs.items())


# ---------------------------------------------------------------------------
# Writing the IWSLT raw layout
# ---------------------------------------------------------------------------


def _talk_tags(talk_id: int) -> list[str]:
    return [f"<url>http://demo.invalid/talks/{talk_id}</url>",
            f"<talkid>{talk_id}</talkid>",
            f"<title>Demo talk {talk_id}</title>"]


def _train_lines(sentences: list[str]) -> list[str]:
    """train.tags lines: a few tag lines before every block of sentences."""
    lines: list[str] = []
    for start in range(0, len(sentences), LINES_PER_TALK):
        lines += _talk_tags(start // LINES_PER_TALK + 1)
        lines += sentences[start:start + LINES_PER_TALK]
    return lines


def _xml_lines(sentences: list[str], set_name: str, lang: str) -> list[str]:
    """IWSLT XML: talks of up to 100 <seg> lines each."""
    if lang == "de":
        header = f'<srcset setid="iwslt2016-{set_name}" srclang="german">'
        footer = "</srcset>"
    else:
        header = (f'<refset setid="iwslt2016-{set_name}" srclang="german" '
                  'trglang="english" refid="ref">')
        footer = "</refset>"
    lines = ['<?xml version="1.0" encoding="UTF-8"?>', "<mteval>", header]
    for start in range(0, len(sentences), 100):
        talk_id = start // 100 + 1
        lines.append(f'<doc docid="{talk_id}" genre="lectures">')
        lines += _talk_tags(talk_id)
        for seg_id, text in enumerate(sentences[start:start + 100], 1):
            lines.append(f'<seg id="{seg_id}"> {escape(text)} </seg>')
        lines.append("</doc>")
    return lines + [footer, "</mteval>"]


def _write_lines(path: str, lines: list[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def _write_files(folder: str, splits: dict[str, list[tuple[str, str]]]) -> None:
    for index, lang in enumerate(("de", "en")):
        train = [pair[index] for pair in splits["train"]]
        _write_lines(os.path.join(folder, TRAIN_NAME.format(lang=lang)), _train_lines(train))
        for set_name, split in ((DEV_SET, "dev"), (TEST_SET, "test")):
            sentences = [pair[index] for pair in splits[split]]
            path = os.path.join(folder, SET_NAME.format(set=set_name, lang=lang))
            _write_lines(path, _xml_lines(sentences, set_name, lang))


def _read_stamp(out_dir: str) -> dict | None:
    try:
        with open(os.path.join(out_dir, STAMP_FILE), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _replace_folder(new_dir: str, out_dir: str) -> None:
    """Move new_dir to out_dir, removing an old demo corpus there."""
    if not os.path.exists(out_dir):
        os.rename(new_dir, out_dir)
        return
    if _read_stamp(out_dir) is None and os.listdir(out_dir):
        shutil.rmtree(new_dir)
        raise FileExistsError(f"{out_dir} exists and is not a demo corpus folder")
    old_dir = tempfile.mkdtemp(prefix=".old_demo_", dir=os.path.dirname(new_dir))
    os.rename(out_dir, os.path.join(old_dir, "corpus"))
    os.rename(new_dir, out_dir)
    shutil.rmtree(old_dir)


def write_demo_corpus(out_dir: str, seed: int = 1234, n_train: int = 20000,
                      n_dev: int = 1000, n_test: int = 1000) -> str:
    """Write the demo corpus in IWSLT raw layout to out_dir; return out_dir.

    Returns at once when out_dir already holds a corpus made with the same
    settings.  Files are written to a temporary folder that is then renamed.
    """
    stamp = {"version": GENERATOR_VERSION, "seed": seed, "n_train": n_train,
             "n_dev": n_dev, "n_test": n_test}
    if _read_stamp(out_dir) == stamp:
        return out_dir
    pairs = generate_pairs(n_train + n_dev + n_test, seed)
    splits = {"train": pairs[:n_train], "dev": pairs[n_train:n_train + n_dev],
              "test": pairs[n_train + n_dev:]}
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=".demo_tmp_", dir=parent)
    _write_files(tmp_dir, splits)
    with open(os.path.join(tmp_dir, STAMP_FILE), "w", encoding="utf-8") as f:
        json.dump(stamp, f)
    _replace_folder(tmp_dir, out_dir)
    return out_dir


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--n_train", type=int, default=20000)
    parser.add_argument("--n_dev", type=int, default=1000)
    parser.add_argument("--n_test", type=int, default=1000)
    args = parser.parse_args()
    print(write_demo_corpus(args.out, args.seed, args.n_train, args.n_dev, args.n_test))


if __name__ == "__main__":
    main()

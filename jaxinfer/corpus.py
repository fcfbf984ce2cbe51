"""A corpus anyone can rebuild: simple English stories from a seeded grammar.

Every word list below is written here (no outside text), so the corpus is this project's own work
under the project's license. `build_corpus(seed, num_stories)` is deterministic; documents are
split by a fixed rule: every `val_every`-th story goes to validation.
"""

from __future__ import annotations

import random

import numpy as np

NAMES = ("Ada Ben Cleo Dan Eva Finn Gus Hana Ivo Jade Kai Lena Milo Nora Otto Pia Quin Rosa Sam Tara Uma Vic "
         "Wren Xena Yuri Zoe Amir Bea Cole Dora Eli Faye Gil Hugo Iris Jon Kira Leo Mae Ned Olga Pete Ruby "
         "Saul Tess Vera Will").split()
ANIMALS = ("cat dog fox owl bear frog duck mouse rabbit horse goat sheep pig cow hen crow deer wolf otter "
           "badger beaver squirrel hedgehog turtle snail bee ant moth lizard seal whale dolphin crab goose "
           "swan robin sparrow eagle hawk lamb pony kitten puppy").split()
PLACES = ("forest river garden village market school library kitchen meadow hill beach harbor castle farm "
          "barn bridge cave island lake mountain park pond road shop station street tower valley well "
          "orchard field bakery museum lighthouse attic cellar playground classroom desert swamp").split()
OBJECTS = ("ball box book basket bell boat bottle bucket cake candle cap chair clock coat coin cup door "
           "drum egg feather flag flower hat jar key kite lamp leaf letter map mirror nest pebble pencil "
           "pie pillow ribbon ring rope scarf seed shell shoe spoon stick stone string toy umbrella wagon "
           "whistle window apple pear plum cookie muffin sandwich blanket lantern compass marble puzzle "
           "shovel teapot trumpet violin wheel").split()
ADJECTIVES = ("big small tiny huge old young new shiny dusty soft hard warm cold bright dark quiet loud "
              "happy sad brave shy kind clever silly sleepy hungry tired curious gentle proud busy lucky "
              "red blue green yellow purple orange golden silver round square heavy light strange "
              "little tall short fast slow wet dry sweet").split()
FEELINGS = "happy sad scared excited proud worried calm surprised grateful lonely cheerful nervous".split()
TIMES = ("one morning|one evening|one rainy day|on a sunny afternoon|late at night|early one spring|"
         "one windy autumn day|on a snowy winter morning|after breakfast|before dinner").split("|")
WEATHER = ("the sun was shining|it was raining softly|the wind was blowing|snow covered the ground|"
           "the sky was full of clouds|the air smelled of flowers|a storm was coming").split("|")
VERBS_FIND = "found|lost|dropped|carried|painted|fixed|hid|shared|borrowed|cleaned|opened|wrapped".split("|")
VERBS_GO = "walked|ran|hurried|wandered|skipped|climbed|sailed|rode|tiptoed|raced".split("|")
ENDINGS = ("and they laughed together|and everyone cheered|and it was the best day ever|"
           "and they became good friends|and they went home for supper|and the {animal} smiled|"
           "and nobody ever forgot it|and they promised to come back soon").split("|")


class Story:
    def __init__(self, rng: random.Random):
        self.r = rng
        self.hero, self.friend = rng.sample(NAMES, 2)
        self.animal = rng.choice(ANIMALS)
        self.place, self.place2 = rng.sample(PLACES, 2)
        self.obj = rng.choice(OBJECTS)

    def adj(self) -> str:
        return self.r.choice(ADJECTIVES)

    def sentence(self) -> str:
        r, h, f = self.r, self.hero, self.friend
        options = [
            f"{h} {r.choice(VERBS_GO)} to the {self.place2} with a {self.adj()} {self.animal}.",
            f"{f} {r.choice(VERBS_FIND)} a {self.adj()} {r.choice(OBJECTS)} near the {self.place}.",
            f"\"Look at this {self.obj}!\" said {h}. \"It is so {self.adj()}.\"",
            f"The {self.animal} felt {r.choice(FEELINGS)} and hid behind the {r.choice(OBJECTS)}.",
            f"{h} asked {f}, \"Can you help me find my {self.obj}?\"",
            f"{f} said, \"Yes, I will help you.\" They looked in the {r.choice(PLACES)}.",
            f"Then {r.choice(WEATHER)}, so {h} and {f} {r.choice(VERBS_GO)} to the {self.place}.",
            f"The {self.adj()} {self.animal} had {r.randint(2, 9)} {r.choice(OBJECTS)}s in a {r.choice(OBJECTS)}.",
            f"{h} was {r.choice(FEELINGS)} because the {self.obj} was {self.adj()}.",
            f"At the {r.choice(PLACES)}, {f} met a {self.adj()} {r.choice(ANIMALS)}.",
        ]
        return r.choice(options)

    def text(self) -> str:
        r = self.r
        opening = (f"{r.choice(TIMES).capitalize()}, {self.hero} and {self.friend} were in the {self.place}. "
                   f"{r.choice(WEATHER).capitalize()}. {self.hero} had a {self.adj()} {self.obj}.")
        middle = " ".join(self.sentence() for _ in range(r.randint(3, 8)))
        ending = f"In the end, {self.hero} found the {self.obj}, " + r.choice(ENDINGS).format(animal=self.animal) + "."
        return f"{opening} {middle} {ending}"


def build_corpus(seed: int, num_stories: int, val_every: int = 20) -> tuple[list[str], list[str]]:
    """(train stories, validation stories): story i goes to validation iff i % val_every == 0."""
    rng = random.Random(seed)
    stories = [Story(rng).text() for _ in range(num_stories)]
    val = [s for i, s in enumerate(stories) if i % val_every == 0]
    train = [s for i, s in enumerate(stories) if i % val_every != 0]
    return train, val


def vocabulary() -> set[str]:
    """Every word the grammar can emit (lower-cased, no punctuation): a few hundred."""
    words = set()
    for group in (NAMES, ANIMALS, PLACES, OBJECTS, ADJECTIVES, FEELINGS, VERBS_FIND, VERBS_GO):
        words |= {w.lower() for w in group}
    for group in (TIMES, WEATHER, ENDINGS):
        for phrase in group:
            words |= {w.strip(",.").lower() for w in phrase.split()}
    return words


def windows(stream: np.ndarray, seq_len: int) -> np.ndarray:
    """[n, seq_len + 1] consecutive windows of a token stream (inputs and next-token targets)."""
    n = (len(stream) - 1) // seq_len
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None]
    return stream[idx]

"""The rule-based rewrites of ``--llm rules``: the two name styles, by hand and over CoNLL04."""

from __future__ import annotations

import json
import re

import pytest

from anchoralign.datasets import load_split
from anchoralign.tokenize import tokenize
from augment.rules import fake_mention, mention_variant, rewrite_answer, shaped_mention

MADE_UP = re.compile(r"(?:zor|vel|qua|mir|tes|dol|kan|bri|ulo|fen|gar|pim)+", re.IGNORECASE)


def test_shaped_keeps_function_words_punctuation_and_months_and_replaces_names():
    new = shaped_mention("Org", "Department of Inland Fisheries and Wildlife", 0)
    words = new.split(" ")
    assert len(words) == 6 and words[1] == "of" and words[4] == "and"
    for i in (0, 2, 3, 5):
        assert MADE_UP.fullmatch(words[i]) and words[i][0].isupper() and words[i][1:].islower()
    assert "Department" not in new and "Wildlife" not in new

    date = shaped_mention("Other", "April 4 , 1968", 0)
    month, day, comma, year = date.split(" ")
    assert (month, comma) == ("April", ",")
    assert day.isdigit() and len(day) == 1 and day != "0"
    assert year.isdigit() and len(year) == 4 and year[0] != "0"
    assert (day, year) != ("4", "1968")

    money = shaped_mention("Other", "$3.6 billion", 1)
    assert re.fullmatch(r"\$[1-9]\.\d billion", money) and money != "$3.6 billion"
    assert re.fullmatch(r"\d+ mph", shaped_mention("Other", "57 mph", 0))


def test_shaped_keeps_case_patterns_acronyms_and_abbreviations():
    acronym = shaped_mention("Org", "DOE", 0)
    assert len(acronym) == 3 and acronym.isupper() and acronym.isalpha()
    initials = shaped_mention("Loc", "U.S.", 0)
    assert re.fullmatch(r"[A-Z]\.[A-Z]\.", initials)
    capitals = shaped_mention("Loc", "PERUGIA", 0)
    assert capitals.isupper() and MADE_UP.fullmatch(capitals)
    hyphen = shaped_mention("Loc", "Shoshone-Bannock reservation", 0)
    assert re.fullmatch(r"[A-Z][a-z]+-[A-Z][a-z]+ reservation", hyphen) and "Shoshone" not in hyphen
    # A known abbreviation keeps its word: "Dol." would tokenise as two tokens where "Md." is one.
    place = shaped_mention("Loc", "Upper Marlboro , Md.", 0)
    assert place.endswith(" , Md.") and not place.startswith("Upper Marlboro")
    assert shaped_mention("Peop", "John F. Kennedy", 0).split(" ")[1][1] == "."
    assert shaped_mention("Other", "2 a.m. EDT", 0).split(" ")[1] == "a.m."


def test_styles_are_deterministic_and_differ_by_variant():
    for make in (fake_mention, shaped_mention):
        assert make("Peop", "Abdul Karim Obeid", 0) == make("Peop", "Abdul Karim Obeid", 0)
        assert make("Peop", "Abdul Karim Obeid", 0) != make("Peop", "Abdul Karim Obeid", 1)
        assert make("Peop", "Abdul Karim Obeid", 0) != make("Loc", "Abdul Karim Obeid", 0)
    # invented: one or two words whatever the original; shaped: the original's word count.
    assert len(fake_mention("Org", "Department of Inland Fisheries and Wildlife", 0).split()) <= 2
    assert len(shaped_mention("Peop", "Abdul Karim Obeid", 0).split()) == 3


def test_the_answer_rewrites_each_inline_entity_in_the_style_asked():
    line = 'Officials of the {"Org": "National Weather Service"} said {"Other": "Monday"} .'
    body = {"messages": [{"role": "user", "content": f"Rewrite.\n{line}"}]}
    shaped = rewrite_answer(body, 2, "shaped").splitlines()
    assert [s[:3] for s in shaped] == ["1. ", "2. "]
    text, mentions = mention_variant(line, 0, "shaped")
    assert shaped[0] == f"1. {text}"
    assert len(mentions[0].split()) == 3 and mentions[1] == "Monday"
    invented = rewrite_answer(body, 1).splitlines()[0]
    assert invented == f"1. {mention_variant(line, 0)[0]}" != shaped[0]


def test_shaped_mentions_tokenise_like_their_originals_on_conll04(shared_data):
    """The point of the style: a rewritten mention tokenises into as many tokens as the original
    does, so its boundaries teach the dataset's. One mention of CoNLL04's training set ("Cuba."
    whose made-up word is the abbreviation "Kan.") is allowed to differ."""
    mismatched = []
    for sample in load_split("conll04", "train", str(shared_data)):
        for e in sample.entities:
            original = " ".join(sample.tokens[e.start : e.end])
            for variant in range(2):
                new = tokenize(shaped_mention(e.type, original, variant))
                if len(new) != len(tokenize(original)):
                    mismatched.append((original, new))
    assert len(mismatched) <= 2, mismatched[:5]


@pytest.mark.parametrize("style", ["invented", "shaped"])
def test_rewrites_keep_the_json_markup_valid(style):
    line = '{"Peop": "O\'Neill \\"Tip\\""} met {"Loc": "St. Louis"} .'
    text, mentions = mention_variant(line, 3, style)
    inline = re.findall(r"\{[^{}]*\}", text)
    assert [next(iter(json.loads(m).values())) for m in inline] == mentions

import pytest

from anchoralign.tokenize import _WORD, detokenize, tokenize, tokenize_with_offsets

TEXTS = [
    "Smith, of U.S. Steel's well-known plant, earned $3,000.50 (2.5%).",
    "Apple,Inc. (IBM)\tand  \u201cAcme\u201d\u2014in Oslo\u2026\n",
    "  Sen. John F. Kennedy -- and/or e.g., 10:30 ... '' ",
    "x\u200by \u00a0 caf\u00e9's na\u00efve",
    "",
    "   ",
]


def test_english_words_and_punctuation():
    text = "Smith, of U.S. Steel's well-known plant, earned $3,000.50 (2.5%)."
    assert tokenize(text) == [
        "Smith",
        ",",
        "of",
        "U.S.",
        "Steel",
        "'s",
        "well-known",
        "plant",
        ",",
        "earned",
        "$",
        "3,000.50",
        "(",
        "2.5",
        "%",
        ")",
        ".",
    ]


def test_chinese_is_character_level():
    assert tokenize("肺炎 患者", "zh") == ["肺", "炎", "患", "者"]
    assert detokenize(["肺", "炎"], "zh") == "肺炎"


def test_tokenize_is_stable_on_its_own_output():
    text = "Mr. Jones met the C.E.O. in New York-based Acme Corp. on 3/4 ."
    toks = tokenize(text)
    assert tokenize(detokenize(toks)) == toks


def test_ptb_abbreviations_initials_and_quotes():
    text = "`` Sen. John F. Kennedy of Acme Inc. -- and Dr. Lee -- said ... '' ."
    assert tokenize(text) == [
        "``",
        "Sen.",
        "John",
        "F.",
        "Kennedy",
        "of",
        "Acme",
        "Inc.",
        "--",
        "and",
        "Dr.",
        "Lee",
        "--",
        "said",
        "...",
        "''",
        ".",
    ]
    # a sentence-final period after an ordinary word is split off
    assert tokenize("He left Paris.") == ["He", "left", "Paris", "."]


@pytest.mark.parametrize("text", TEXTS)
def test_offsets_slice_the_text_to_each_token(text):
    tokens, spans = tokenize_with_offsets(text)
    assert tokens == [text[a:b] for a, b in spans]
    bounds = [0, *(i for span in spans for i in span), len(text)]
    assert bounds == sorted(bounds) and all(a < b for a, b in spans)  # in order, never overlapping
    gaps = [text[bounds[i] : bounds[i + 1]] for i in range(0, len(bounds), 2)]
    assert "".join(gaps).strip() == ""  # nothing but whitespace is left out


@pytest.mark.parametrize("text", TEXTS)
def test_offset_tokens_are_the_word_list_the_models_were_trained_on(text):
    assert tokenize_with_offsets(text)[0] == _WORD.findall(text) == tokenize(text)


def test_attached_punctuation_is_split_with_its_offsets():
    text = "Apple, (IBM) and Acme."
    tokens, spans = tokenize_with_offsets(text)
    assert tokens == ["Apple", ",", "(", "IBM", ")", "and", "Acme", "."]
    assert spans[:5] == [(0, 5), (5, 6), (7, 8), (8, 11), (11, 12)]


def test_chinese_offsets_skip_spaces():
    assert tokenize_with_offsets("肺炎 患者", "zh") == (
        ["肺", "炎", "患", "者"],
        [(0, 1), (1, 2), (3, 4), (4, 5)],
    )

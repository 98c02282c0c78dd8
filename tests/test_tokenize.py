from anchoralign.tokenize import detokenize, tokenize


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

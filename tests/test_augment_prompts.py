"""Prompt markup, eligibility and template loading/rendering (augment/prompts.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
from augment_fixtures import conll_like, words

from anchoralign.errors import UserError
from anchoralign.schema import Entity, Relation, Sample
from augment.parse import parse_context_answer, parse_mention_answer
from augment.prompts import (
    PROMPTS_DIR,
    SKIP_REASONS,
    PromptSet,
    PromptTemplate,
    eligibility,
    markup_context,
    markup_mentions,
    position_order,
)


@dataclass
class Meta:
    language: str = "en"
    entity_types: dict[str, str] = field(
        default_factory=lambda: {"Loc": "Location", "Org": "Organization", "Peop": "People", "Other": "Other"}
    )
    relation_types: dict[str, str] = field(
        default_factory=lambda: {"Work_For": "Work for", "OrgBased_In": "Organization based in"}
    )


def test_markup_mentions_writes_each_entity_inline_with_its_label():
    assert markup_mentions(conll_like()) == (
        'Sen. {"Peop": "John Smith"} , who works for {"Org": "Acme Corp."} in {"Loc": "Boston"} , '
        'met {"Peop": "Mary Jones"} .'
    )


def test_markup_mentions_json_escapes_quotes_and_keeps_non_ascii():
    s = Sample(
        id="q", tokens=['"', "Böse", '"', "Inc", "rose"], entities=[Entity(start=0, end=4, type="Org")]
    )
    line = markup_mentions(s)
    assert line == '{"Org": "\\" Böse \\" Inc"} rose'
    # The parser decodes the escapes back to the original mention.
    assert parse_mention_answer("1. " + line, s).rejected[0].reason == "mention_unchanged"


def test_markup_context_numbers_placeholders_by_entity_index():
    assert markup_context(conll_like()) == "Sen. <mask0> , who works for <mask1> in <mask2> , met <mask3> ."


def test_unsorted_entities_render_by_position_with_index_numbers():
    s = Sample(
        id="u",
        tokens=words("Alice met Bob"),
        entities=[Entity(start=2, end=3, type="Peop"), Entity(start=0, end=1, type="Peop")],
    )
    assert position_order(s) == [1, 0]
    assert markup_context(s) == "<mask1> met <mask0>"
    assert markup_mentions(s) == '{"Peop": "Alice"} met {"Peop": "Bob"}'


def test_chinese_markup_joins_characters_without_spaces():
    s = Sample(
        id="zh",
        tokens=list("李明在北京工作。"),
        entities=[Entity(start=0, end=2, type="PER"), Entity(start=3, end=5, type="LOC")],
    )
    assert markup_mentions(s, "zh") == '{"PER": "李明"}在{"LOC": "北京"}工作。'
    assert markup_context(s, "zh") == "<mask0>在<mask1>工作。"


@pytest.mark.parametrize(
    ("entities", "tokens", "reason"),
    [
        ([], "a b c", "no_entities"),
        ([(0, 3, "Org"), (1, 2, "Loc")], "a b c", "nested_entities"),
        ([(0, 2, "Org"), (1, 3, "Loc")], "a b c", "nested_entities"),
        ([(0, 1, "Org")], "a { c", "markup_in_source"),
        ([(0, 1, "Org")], "a <MASK1> c", "markup_in_source"),
        ([(0, 1, "Org"), (1, 3, "Loc")], "a b c", None),
    ],
)
def test_eligibility(entities, tokens, reason):
    s = Sample(
        id="e", tokens=tokens.split(), entities=[Entity(start=a, end=b, type=t) for a, b, t in entities]
    )
    assert eligibility(s) == reason
    assert reason is None or reason in SKIP_REASONS


def test_a_sentence_with_more_entities_than_mask_tokens_is_skipped():
    from anchoralign.schema import N_MASK_TOKENS, mask_token

    def sample(n: int) -> Sample:
        return Sample(
            id="m", tokens=["w"] * n, entities=[Entity(start=i, end=i + 1, type="Loc") for i in range(n)]
        )

    assert eligibility(sample(N_MASK_TOKENS)) is None
    assert eligibility(sample(N_MASK_TOKENS + 1)) == "too_many_entities"
    # ... so every placeholder of the masked corpus is one of the model's mask tokens.
    from model_fixtures import TOY_META

    from anchoralign.model import AnchorAlignModel

    tokenizer = AnchorAlignModel.from_backbone("tiny", TOY_META).tokenizer
    ids = tokenizer.convert_tokens_to_ids([mask_token(i) for i in range(N_MASK_TOKENS)])
    assert tokenizer.unk_token_id not in ids and len(set(ids)) == N_MASK_TOKENS


def test_markup_refuses_overlapping_entities():
    s = Sample(
        id="n",
        tokens=words("a b c"),
        entities=[Entity(start=0, end=3, type="X"), Entity(start=1, end=2, type="Y")],
    )
    with pytest.raises(ValueError, match="overlap"):
        markup_mentions(s)


def test_mention_messages_end_with_the_marked_up_sentence():
    prompts = PromptSet()
    sample = conll_like()
    messages = prompts.mention_messages(sample, Meta(), k=4)
    roles = [m["role"] for m in messages]
    assert roles[0] == "system" and roles[-1] == "user"
    assert roles[1:-1] == ["user", "assistant"] * ((len(roles) - 2) // 2)
    last = messages[-1]["content"]
    assert last.splitlines()[-1] == markup_mentions(sample)
    assert "4" in last
    assert '- "John Smith" Work_For "Acme Corp." (Work for)' in last
    assert (
        "- Peop (People)" in last and "- Other\n" in last
    )  # a description equal to its label is not repeated
    assert "Write 4 versions, each with 4 items and new text in every item:" in last
    assert prompts.mention_version == "mention_rewrite.v2"


def test_context_messages_list_placeholders_and_relations():
    prompts = PromptSet()
    sample = conll_like()
    last = prompts.context_messages(sample, Meta(), k=3)[-1]["content"]
    assert last.splitlines()[-1] == markup_context(sample)
    assert "- <mask3>: Peop (People)" in last
    assert "- <mask1> OrgBased_In <mask2> (Organization based in)" in last
    assert "Placeholders, all 4 in every sentence:" in last
    assert "Write 3 new sentences, each with <mask0>, <mask1>, <mask2> and <mask3>:" in last
    assert prompts.context_version == "context_rewrite.v2"


def test_few_shot_examples_are_chosen_by_language():
    prompts = PromptSet()
    en = prompts.mention_messages(conll_like(), Meta(), k=3)
    zh_sample = Sample(id="zh", tokens=list("李明在北京"), entities=[Entity(start=0, end=2, type="PER")])
    zh = prompts.mention_messages(zh_sample, Meta(language="zh"), k=3)
    assert any("Anna Berg" in m["content"] for m in en) and not any("周明" in m["content"] for m in en)
    assert any("周明" in m["content"] for m in zh) and not any("Anna Berg" in m["content"] for m in zh)
    assert zh[-1]["content"].splitlines()[-1] == '{"PER": "李明"}在北京'


def _example_pairs(template: PromptTemplate, language: str) -> list[tuple[str, str]]:
    sections = template.sections_for(language)[1:-1]
    return [(u.text.splitlines()[-1], a.text) for u, a in zip(sections[::2], sections[1::2], strict=True)]


# The few-shot sentences of the shipped templates, as samples, so their answers can be parsed.
EXAMPLES = {
    "en": Sample(
        id="ex-en",
        tokens=words(
            "Anna Berg , a captain with the Nordic Ferry Company in Bergen , retired on Friday after 31 years ."
        ),
        entities=[
            Entity(start=0, end=2, type="Peop"),
            Entity(start=6, end=10, type="Org"),
            Entity(start=11, end=12, type="Loc"),
            Entity(start=15, end=16, type="Other"),
        ],
        relations=[Relation(head=0, tail=1, type="Work_For"), Relation(head=1, tail=2, type="OrgBased_In")],
    ),
    "zh": Sample(
        id="ex-zh",
        tokens=list("周明去年加入了星河研究所。"),
        entities=[Entity(start=0, end=2, type="PER"), Entity(start=7, end=12, type="ORG")],
        relations=[Relation(head=0, tail=1, type="Work_For")],
    ),
}


@pytest.mark.parametrize("language", ["en", "zh"])
def test_shipped_few_shot_answers_pass_our_own_parser(language):
    prompts = PromptSet()
    sample = EXAMPLES[language]
    [(m_line, m_answer)] = _example_pairs(prompts.mention, language)
    [(c_line, c_answer)] = _example_pairs(prompts.context, language)
    assert m_line == markup_mentions(sample, language)
    assert c_line == markup_context(sample, language)
    mention = parse_mention_answer(m_answer, sample, language)
    context = parse_context_answer(c_answer, sample, language)
    assert (len(mention.accepted), mention.rejected) == (2, [])
    assert (len(context.accepted), context.rejected) == (2, [])


def _write(folder: Path, name: str, text: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.txt").write_text(text, encoding="utf-8")


GOOD = "header\n=== system ===\nsys {{k}}\n=== user ===\nrewrite:\n{{sentence}}\n"


def test_custom_prompts_dir_and_fingerprint(tmp_path):
    _write(tmp_path, "m.v9", GOOD)
    _write(tmp_path, "c.v9", GOOD)
    prompts = PromptSet("m.v9", "c.v9", prompts_dir=tmp_path)
    messages = prompts.mention_messages(conll_like(), Meta(), k=5)
    assert messages == [
        {"role": "system", "content": "sys 5"},
        {"role": "user", "content": "rewrite:\n" + markup_mentions(conll_like())},
    ]
    assert prompts.mention_version == "m.v9" and len(prompts.mention.sha256) == 64


def test_values_are_not_substituted_twice(tmp_path):
    _write(tmp_path, "t", GOOD)
    messages = PromptTemplate.load("t", tmp_path).render({"k": "{{sentence}}", "sentence": "x"}, "en")
    assert messages[0]["content"] == "sys {{sentence}}"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("no headers at all\n", "no section headers"),
        (
            "=== system ===\nhi {{colour}}\n=== user ===\n{{sentence}}\n",
            r":2: unknown variable \{\{colour\}\}",
        ),
        ("=== user ===\n{{sentence}}\n", "expected system"),
        ("=== system ===\ns\n=== user ===\na\n=== user ===\n{{sentence}}\n", "read system, user, user;"),
        (
            "=== system ===\ns\n=== user ===\n{{sentence}} please\n",
            r":3: the last line of the final user section",
        ),
        (
            "=== system ===\ns\n=== user [zh] ===\n{{sentence}}\n",
            "sections without a language tag read system;",
        ),
        ("=== system ===\n\n=== user ===\n{{sentence}}\n", r":1: empty system section"),
    ],
)
def test_bad_templates_are_user_errors_naming_the_file(tmp_path, text, message):
    _write(tmp_path, "bad", text)
    with pytest.raises(UserError, match=message) as err:
        PromptTemplate.load("bad", tmp_path)
    assert str(tmp_path / "bad.txt") in str(err.value)


def test_variable_missing_for_the_prompt_kind_is_a_user_error(tmp_path):
    _write(tmp_path, "m", "=== system ===\n{{placeholders}}\n=== user ===\n{{sentence}}\n")
    _write(tmp_path, "c", GOOD)
    with pytest.raises(UserError, match=r"m.txt:1: \{\{placeholders\}\} is not available"):
        PromptSet("m", "c", prompts_dir=tmp_path).mention_messages(conll_like(), Meta(), k=3)


def test_unknown_template_lists_the_available_ones(tmp_path):
    _write(tmp_path, "only.v1", GOOD)
    with pytest.raises(UserError, match=r"'missing' not found in .* \(available: only.v1\)"):
        PromptTemplate.load("missing", tmp_path)


def test_shipped_templates_exist_for_both_kinds():
    assert (PROMPTS_DIR / "mention_rewrite.v1.txt").is_file()
    assert (PROMPTS_DIR / "context_rewrite.v1.txt").is_file()


def test_a_template_may_end_with_another_line_when_its_loader_says_so(tmp_path):
    _write(
        tmp_path,
        "q.v1",
        "=== system ===\nsys\n=== user ===\nSentence: {{sentence}}\nQuestion: {{question}}\n",
    )
    with pytest.raises(
        UserError, match=r"q.v1.txt:3: the last line of the final user section must be \{\{sentence\}\}"
    ):
        PromptTemplate.load("q.v1", tmp_path)
    assert PromptTemplate.load("q.v1", tmp_path, last_line="Question: {{question}}").name == "q.v1"

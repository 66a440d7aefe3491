"""IFEval-style instruction constraints: each type on hand-made responses, the share score, loose mode, bad specs."""

import pytest

from rewards.constraints import (TYPES, check_constraints, constraint_results, constraints_score, count_words,
                                 split_sentences)
from rewards.verifiable import get_verifier


@pytest.mark.parametrize("text, words", [
    ("one two three", 3),
    ("don't stop", 3),  # "don", "t", "stop": IFEval's \w+ count
    ("state-of-the-art, 3.5 times", 7),  # state of the art 3 5 times
    ("  \n ", 0),
    ("naïve café", 2),  # unicode letters are word characters
])
def test_count_words(text, words):
    assert count_words(text) == words


@pytest.mark.parametrize("text, sentences", [
    ("One. Two! Three?", ["One.", "Two!", "Three?"]),
    ("Pi is 3.14 today. Visit example.com now.", ["Pi is 3.14 today.", "Visit example.com now."]),
    ("Dr. Smith met J. Doe at 5 p.m. in the U.S. Then they left.",
     ["Dr. Smith met J. Doe at 5 p.m. in the U.S. Then they left."]),  # abbreviations never end one mid-paragraph
    ('He said "stop." She stopped.', ['He said "stop.', "She stopped."]),
    ("Really?! Yes", ["Really?!", "Yes"]),
    ("A heading\n\nBody text. More", ["A heading", "Body text.", "More"]),  # a blank line ends a sentence
    ("I said no. Then e.g. this.", ["I said no.", "Then e.g. this."]),
    ("See Dr.\n \nNew paragraph.", ["See Dr.", "New paragraph."]),  # a blank line ends one even after "Dr."
    ("... !", []),  # no word: no sentence
])
def test_split_sentences(text, sentences):
    assert split_sentences(text) == sentences


def holds(text, constraint, strict=True):
    return constraint_results(text, [constraint], strict=strict)[0]


ESSAY = "The sky is blue. Water is wet. Fire is hot."


TYPE_CASES = [
    ({"type": "word_count", "min": 3}, "one two three", True),
    ({"type": "word_count", "max": 2}, "one two three", False),  # IFEval "less than 3" is max 2
    ({"type": "word_count", "min": 2, "max": 3}, "don't stop", True),  # 3 words
    ({"type": "word_count", "count": 2}, "don't stop", False),
    ({"type": "sentence_count", "count": 3}, ESSAY, True),
    ({"type": "sentence_count", "max": 2}, ESSAY, False),
    ({"type": "sentence_count", "min": 1, "max": 1}, "Mr. Lee paid $3.50 at 9 a.m. sharp.", True),
    ({"type": "keywords", "include": ["Sky", "water"]}, ESSAY, True),  # case-insensitive
    ({"type": "keywords", "include": ["cat"]}, "A category of things.", False),  # whole words only
    ({"type": "keywords", "include": ["is blue"]}, ESSAY, True),  # a phrase
    ({"type": "keywords", "exclude": ["hot"]}, ESSAY, False),
    ({"type": "keywords", "exclude": ["hot"]}, "Hotter than ever.", True),
    ({"type": "keywords", "include": ["sky"], "exclude": ["fire"]}, ESSAY, False),
    ({"type": "keyword_frequency", "keyword": "is", "count": 3}, ESSAY, True),
    ({"type": "keyword_frequency", "keyword": "is", "min": 4}, ESSAY + " This island.", False),  # not "This"
    ({"type": "keyword_frequency", "keyword": "c++", "min": 2}, "C++ and c++ again", True),  # escaped, not a regex
    ({"type": "case", "value": "lower"}, "all lower, even 42!", True),
    ({"type": "case", "value": "lower"}, "all lower but One", False),
    ({"type": "case", "value": "lower"}, "123 !", False),  # nothing cased is neither lower nor upper
    ({"type": "case", "value": "upper"}, "ALL CAPS, 2024.", True),
    ({"type": "capital_words", "min": 2}, "I like NASA and the U-BOAT.", True),  # "I", "NASA", "U-BOAT"
    ({"type": "capital_words", "max": 1}, "I like NASA.", False),
    ({"type": "bullet_list", "count": 3}, "Intro:\n* one\n* two\n  - nested\n**bold** line\n---\n-5 degrees", True),
    ({"type": "bullet_list", "count": 2}, "* one\n* two\n* three", False),
    ({"type": "bullet_list", "count": 0}, "1. numbered\n2. list", True),  # numbered items are not bullets
    ({"type": "paragraphs", "count": 3}, "One.\n***\nTwo.\n***\nThree.", True),
    ({"type": "paragraphs", "count": 2}, "***\nOne.\n***\nTwo.\n***", True),  # dividers at the ends are dropped
    ({"type": "paragraphs", "count": 2}, "One.\n***\n***\nTwo.", False),  # an empty middle paragraph fails
    ({"type": "paragraphs", "count": 1}, "One.\n\nTwo.", True),  # blank lines are not dividers by default
    ({"type": "paragraphs", "count": 2, "separator": "blank_line"}, "One.\n\n  \n\nTwo.\n", True),
    ({"type": "placeholders", "min": 2}, "Dear [name], your order [order id] ships.", True),
    ({"type": "placeholders", "min": 1}, "Empty [] and [ ] are no placeholders.", False),
    ({"type": "highlights", "min": 2}, "*first* and **second** but not ** ** or *\nbroken*", True),
    ({"type": "highlights", "min": 3}, "*first* and **second**", False),
    ({"type": "json_format"}, '```json\n{"a": [1, 2]}\n```', True),
    ({"type": "json_format"}, '  {"a": 1}  ', True),
    ({"type": "json_format"}, 'Here it is: {"a": 1}', False),  # the entire output must be JSON
    ({"type": "json_format"}, '{"a": 1,}', False),
    ({"type": "starts_with", "value": "My answer is"}, "  my answer is yes.", True),
    ({"type": "starts_with", "value": "My answer is"}, "Well, my answer is yes.", False),
    ({"type": "ends_with", "value": "Any other questions?"}, '"That is all. Any other questions?"\n', True),
    ({"type": "ends_with", "value": "Any other questions?"}, "Any other questions? Bye.", False),
    ({"type": "no_commas"}, "No commas here.", True),
    ({"type": "no_commas"}, "One, two.", False),
    ({"type": "title"}, "<<A Poem of Joy>>\nRoses are red.", True),
    ({"type": "title"}, "<< >> and <<broken\ntitle>>", False),
    ({"type": "postscript"}, "Main text.\n\np.s. remember the milk", True),  # case-insensitive
    ({"type": "postscript"}, "Main text. Note the P.S. at the end.", False),  # must start a line
    ({"type": "postscript", "marker": "P.P.S"}, "Text.\nP.P.S Also this.", True),
    ({"type": "quotation"}, '  "Wrapped in quotes."  ', True),
    ({"type": "quotation"}, '"', False),
    ({"type": "quotation"}, 'Said "this"', False),
]


@pytest.mark.parametrize("constraint, text, expected", TYPE_CASES)
def test_constraint_types(constraint, text, expected):
    assert holds(text, constraint) is expected


def test_every_type_is_tested():
    assert {c["type"] for c, _, _ in TYPE_CASES} == set(TYPES)


def test_score_is_the_share_met():
    constraints = [{"type": "word_count", "max": 10}, {"type": "no_commas"}, {"type": "case", "value": "upper"},
                   {"type": "keywords", "include": ["sky"]}]
    assert constraint_results("The sky, today, is blue.", constraints) == [True, False, False, True]
    assert constraints_score("The sky, today, is blue.", constraints) == 0.5
    assert constraints_score("THE SKY IS BLUE", constraints) == 1.0


def test_empty_response_follows_nothing():
    # "no commas" and "at most 10 words" hold vacuously on an empty text; IFEval counts them as not followed
    assert constraints_score("  \n", [{"type": "no_commas"}, {"type": "word_count", "max": 10}]) == 0.0


def test_loose_drops_a_preamble_line_or_markup():
    text = "Sure! Here is my answer:\nmy answer is lower case\n**Hope this helps!**"
    lower = {"type": "case", "value": "lower"}
    ends = {"type": "ends_with", "value": "hope this helps!"}
    assert holds(text, lower) is False
    assert holds(text, lower, strict=False) is True  # first and last lines removed
    assert holds(text, ends) is False  # the closing "**" is in the way
    assert holds(text, ends, strict=False) is True  # markup removed
    assert holds("Sure!\nHELLO", {"type": "word_count", "count": 3}, strict=False) is False  # no variant has 3


@pytest.mark.parametrize("constraints, error", [
    ([], r"meta.constraints: expected a non-empty list"),
    ({"type": "no_commas"}, r"meta.constraints: expected a non-empty list"),
    (["no_commas"], r"meta.constraints\[0\]: expected a mapping with a type"),
    ([{"type": "no_commas"}, {"type": "haiku"}], r"meta.constraints\[1\].type: unknown constraint 'haiku' \(known: "
                                                 r"word_count, sentence_count"),
    ([{"type": ["no_commas"]}], r"meta.constraints\[0\].type: unknown constraint \['no_commas'\]"),
    ([{"type": "word_count", "minimum": 3}], r"meta.constraints\[0\].minimum: not a parameter of word_count "
                                             r"\(its parameters: count, min, max\)"),
    ([{"type": "no_commas", "count": 0}], r"\[0\].count: not a parameter of no_commas \(its parameters: none\)"),
    ([{"type": "word_count"}], r"meta.constraints\[0\]: word_count needs count, min or max"),
    ([{"type": "word_count", "min": "50"}], r"\[0\].min: '50' is not a whole number >= 0"),
    ([{"type": "word_count", "min": True}], r"\[0\].min: True is not a whole number >= 0"),
    ([{"type": "word_count", "max": -1}], r"\[0\].max: -1 is not a whole number >= 0"),
    ([{"type": "keyword_frequency", "min": 2}], r"\[0\].keyword: missing; keyword_frequency needs it"),
    ([{"type": "keywords"}], r"\[0\]: keywords needs include or exclude"),
    ([{"type": "keywords", "include": "sky"}], r"\[0\].include: expected a list of words or phrases, got 'sky'"),
    ([{"type": "keywords", "exclude": ["ok", ""]}], r"\[0\].exclude: expected a list of words or phrases"),
    ([{"type": "case", "value": "title"}], r"\[0\].value: 'title' is not lower or upper"),
    ([{"type": "starts_with", "value": " "}], r"\[0\].value: expected a non-empty string"),
    ([{"type": "paragraphs", "count": 2, "separator": "---"}], r"\[0\].separator: '---' is not \*\*\* or blank_line"),
])
def test_bad_constraints_name_index_and_key(constraints, error):
    with pytest.raises(ValueError, match=error):
        check_constraints(constraints)


def test_constraints_verifier_reads_meta():
    verify = get_verifier("constraints")
    message = {"role": "assistant", "content": "Okay:\nhello world"}
    meta = {"constraints": [{"type": "case", "value": "lower"}, {"type": "word_count", "min": 2}]}
    assert verify(message, meta) == 0.5  # "Okay" is capitalised; 3 words
    assert verify(message, {**meta, "strict": False}) == 1.0
    with pytest.raises(ValueError, match="meta.constraints: missing; the 'constraints' verifier needs it"):
        verify(message, {})
    with pytest.raises(ValueError, match="meta.strict: expected true or false, got 'no'"):
        verify(message, {**meta, "strict": "no"})

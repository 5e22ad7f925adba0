from hypothesis import given
from hypothesis import strategies as st

from pipeline.core.words import split_at, split_words


def texts_of(text: str) -> list[str]:
    return [text[s:e] for s, e in split_words(text)]


def test_punctuation_is_split_like_bert():
    assert texts_of("Hello, world! It's 3.5pm") == ["Hello", ",", "world", "!", "It", "'", "s", "3", ".", "5pm"]


def test_one_word_per_cjk_character():
    assert texts_of("我爱北京 天安门") == ["我", "爱", "北", "京", "天", "安", "门"]
    assert texts_of("東京タワーへ") == ["東", "京", "タ", "ワ", "ー", "へ"]
    assert texts_of("서울 시") == ["서", "울", "시"]


def test_emoji_zwj_sequence_stays_one_word_with_code_point_offsets():
    text = "hi 👨‍👩‍👧 Obama😀!"
    words = split_words(text)
    assert [text[s:e] for s, e in words] == ["hi", "👨‍👩‍👧", "Obama", "😀", "!"]
    # offsets are Python string indices (code points), what Label Studio writes
    assert words[2] == (text.index("Obama"), text.index("Obama") + 5)


def test_crlf_and_zero_width_characters_separate_words():
    text = "New\r\nYork\u200bCity"
    assert texts_of(text) == ["New", "York", "City"]


def test_combining_marks_stay_with_their_letter():
    text = "Jose\u0301 Mari\u0301a"
    assert texts_of(text) == ["Jose\u0301", "Mari\u0301a"]


def test_split_at_cuts_words_at_entity_edges():
    text = "#Obama2024 rocks"
    words = split_at(split_words(text), [1, 6])
    assert [text[s:e] for s, e in words] == ["#", "Obama", "2024", "rocks"]


@given(st.text(max_size=200))
def test_words_are_exact_non_overlapping_slices(text):
    words = split_words(text)
    previous_end = 0
    for start, end in words:
        assert previous_end <= start < end <= len(text)
        assert not text[start:end].isspace()
        previous_end = end
    # everything between words is whitespace or a format/control character
    covered = set()
    for start, end in words:
        covered.update(range(start, end))
    for i, ch in enumerate(text):
        if i not in covered:
            assert ch.isspace() or not ch.isprintable()


@given(st.text(alphabet=st.characters(max_codepoint=127), max_size=200))
def test_ascii_fast_path_equals_the_unicode_rules(text):
    from pipeline.core.words import _WORD

    assert split_words(text) == [m.span() for m in _WORD.finditer(text)]

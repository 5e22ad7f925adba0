from hypothesis import given
from hypothesis import strategies as st

from pipeline.tags import spans_to_tags, tag_names, tags_to_spans


@st.composite
def spans(draw):
    n = draw(st.integers(min_value=0, max_value=30))
    cuts = sorted(draw(st.sets(st.integers(min_value=0, max_value=n), max_size=12)))
    result = []
    for a, b in zip(cuts[::2], cuts[1::2]):
        if b > a:
            result.append((a, b, draw(st.sampled_from(["PER", "LOC", "geo-loc"]))))
    return n, result


@given(spans(), st.sampled_from(["BIO", "BIOES"]))
def test_spans_survive_a_round_trip_through_tags(case, scheme):
    n, original = case
    tags = spans_to_tags(n, original, scheme)
    assert len(tags) == n
    assert all(t in tag_names(["PER", "LOC", "geo-loc"], scheme) for t in tags)
    assert tags_to_spans(tags) == original


def test_adjacent_entities_of_one_type_stay_apart():
    # the ML-backend example merges these with groupby; we must not
    assert tags_to_spans(["B-PER", "B-PER", "I-PER", "O"]) == [(0, 1, "PER"), (1, 3, "PER")]


def test_ill_formed_inside_tag_starts_an_entity():
    assert tags_to_spans(["O", "I-LOC", "I-LOC", "I-PER"]) == [(1, 3, "LOC"), (3, 4, "PER")]

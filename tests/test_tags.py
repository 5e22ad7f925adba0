from hypothesis import given
from hypothesis import strategies as st

from pipeline.core.tags import (
    allowed_transitions,
    close_window_edges,
    first_violation,
    spans_to_tags,
    tag_names,
    tags_to_spans,
)


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


TAG_SETS = {"BIO": tag_names(["PER", "LOC"], "BIO"), "BIOES": tag_names(["PER", "LOC"], "BIOES")}


@given(st.sampled_from(["BIO", "BIOES"]), st.data())
def test_allowed_transitions_agree_with_the_sequence_check(scheme, data):
    tags = TAG_SETS[scheme]
    sequence = data.draw(st.lists(st.sampled_from(tags), min_size=1, max_size=8))
    start, follows, end = allowed_transitions(tags, scheme)
    ids = [tags.index(t) for t in sequence]
    by_matrix = start[ids[0]] and end[ids[-1]] and all(follows[a][b] for a, b in zip(ids, ids[1:]))
    assert by_matrix == (first_violation(sequence, scheme) is None)


@given(spans(), st.sampled_from(["BIO", "BIOES"]))
def test_tags_made_from_spans_never_violate_the_scheme(case, scheme):
    n, original = case
    assert first_violation(spans_to_tags(n, original, scheme), scheme) is None


def test_known_forbidden_transitions():
    tags = TAG_SETS["BIO"]
    start, follows, _ = allowed_transitions(tags, "BIO")
    i = tags.index
    assert not start[i("I-PER")] and start[i("B-PER")]
    assert not follows[i("O")][i("I-PER")] and not follows[i("B-LOC")][i("I-PER")]
    assert follows[i("B-PER")][i("I-PER")] and follows[i("I-PER")][i("B-PER")]
    assert first_violation(["O", "I-PER"], "BIO") == 1
    assert first_violation(["B-PER", "I-PER"], "BIOES") == 1  # an entity must close with E-


@given(spans(), st.sampled_from(["BIO", "BIOES"]), st.data())
def test_a_window_cut_anywhere_is_re_tagged_well_formed(case, scheme, data):
    n, original = case
    tags = spans_to_tags(n, original, scheme)
    lo = data.draw(st.integers(0, n))
    hi = data.draw(st.integers(lo, n))
    window = close_window_edges(tags[lo:hi], scheme, cut_before=lo > 0, cut_after=hi < n)
    assert first_violation(window, scheme) is None
    # the types of the words do not change, only where entities start and end
    assert [t.partition("-")[2] for t in window] == [t.partition("-")[2] for t in tags[lo:hi]]

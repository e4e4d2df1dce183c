"""Aggregating region descriptions into explanations of the world's open vocabulary."""

import pytest

from explain.aggregate import CANNOT_TELL, Explanation, aggregate, concept_attributes, names_exactly, parse, phrase


def test_shared_colour_any_shape():
    e = aggregate(["small striped red circle at top left", "large red letter k at bottom right",
                   "large solid red square at top right", "small outline blue star at top left"])
    assert e.region == {"color": "red", "object": "yes"}
    assert e.text() == "a red object"
    assert names_exactly(e, "color:red") and not names_exactly(e, "shape:circle")


def test_a_cell_whatever_it_holds():
    e = aggregate(["small red circle at top left", "empty plain dark background at top left",
                   "large outline blue star at top left", "empty noisy light background at top left"])
    assert e.text() == "something at top left"
    assert names_exactly(e, "cell:top left")


def test_parts_and_backgrounds():
    edge = aggregate(["edge of large solid red circle at top left", "edge of small striped blue square at top right",
                      "edge of small green letter e at bottom left", "edge of large outline pink star at top right"])
    assert edge.text() == "edge of an object" and names_exactly(edge, "part:edge")
    dark = aggregate(["empty plain dark background at top left", "empty noisy dark background at bottom right"])
    assert dark.text() == "empty dark background" and names_exactly(dark, "tone:dark")
    assert not names_exactly(dark, "background")


def test_conjunctions_do_not_count_for_either_concept():
    e = aggregate(["small green triangle at top left", "large striped green triangle at bottom left"])
    assert e.region["shape"] == "triangle" and e.region["color"] == "green"
    assert not names_exactly(e, "color:green") and not names_exactly(e, "shape:triangle")


def test_nothing_shared_is_cannot_tell_and_weights_count():
    assert aggregate(["small red circle at top left", "empty plain dark background at bottom right"]).text() \
        == CANNOT_TELL
    e = aggregate(["large red circle at top left", "small blue square at bottom right"], weights=[0.9, 0.1])
    assert e.region.get("color") == "red"
    with pytest.raises(ValueError, match="one positive weight per description"):
        aggregate(["a"], weights=[0.0])


def test_context_needs_a_margin_over_the_base_rate():
    descs = ["empty plain light background at top right"] * 5
    caps = ["small red circle at top left", "large striped red square at bottom left",
            "small red letter k at bottom right , large blue star at top left", "large red diamond at top left",
            "small solid red triangle at bottom left"]
    negs = ["small blue circle at top left", "large green square at bottom left", "small yellow star at top left",
            "large cyan diamond at bottom right", "small pink letter e at top left"]
    e = aggregate(descs, captions=caps, negative_captions=negs)
    assert e.text() == "empty plain light background at top right ; the image also holds a red object"
    assert parse(e.text()) == e
    # an attribute every image holds anyway (small objects here) is not context
    e2 = aggregate(descs, captions=caps, negative_captions=caps)
    assert e2.context == {}


def test_phrases_round_trip_through_parse():
    for attrs in ({"color": "red", "object": "yes"}, {"cell": "top left"}, {"shape": "letter k", "object": "yes"},
                  {"size": "small", "fill": "striped", "object": "yes", "cell": "bottom right"},
                  {"background": "yes", "tone": "dark"}, {"part": "interior", "object": "yes"}):
        assert parse(phrase(attrs)).region == attrs, phrase(attrs)
    assert concept_attributes("texture:noisy") == {"texture": "noisy", "background": "yes"}
    assert Explanation().text() == CANNOT_TELL


def test_silent_regions_drop_what_does_not_tell_the_feature_apart():
    # most strongest examples of a red feature are large; silent regions hold large objects of other colours
    descs = ["large solid red circle at top left", "large red letter k at bottom right", "small striped red star at top right",
             "large outline red square at bottom left", "large striped red diamond at top left"]
    silent = ["large solid blue circle at top left", "empty plain dark background at top right",
              "large striped green square at bottom left", "small cyan letter e at bottom right"]
    assert aggregate(descs).text() == "a large red object"  # shares alone keep "large"
    assert aggregate(descs, silent=silent).text() == "a red object"
    # a cell feature: most cells hold an object, and so do the silent regions in the other cells
    cell = ["small red circle at top left", "large blue star at top left", "empty plain dark background at top left",
            "large striped green square at top left", "small pink letter t at top left"]
    other = ["small yellow circle at top right", "empty noisy light background at bottom left",
             "large outline orange diamond at bottom right", "large purple letter e at top right"]
    assert aggregate(cell).text() == "an object at top left"
    assert aggregate(cell, silent=other).text() == "something at top left"
    # nothing tells them apart: cannot tell
    assert aggregate(["small red circle at top left", "large blue star at top right"],
                     silent=["small red circle at top right", "large blue star at top left"]).text() == CANNOT_TELL


def test_ties_go_to_the_most_specific_attribute_and_implied_ones_are_not_named():
    letters = ["large pink letter k at top left", "edge of small blue letter k at top right",
               "interior of large red letter k at bottom left"]
    silent = ["empty plain dark background at top left", "empty noisy light background at bottom right"]
    e = aggregate(letters, silent=silent)
    assert e.text() == "a letter k" and names_exactly(e, "shape:letter k")  # not "a solid object" (glyphs are solid)
    inside = ["interior of large solid red circle at top left", "interior of large striped blue square at top right",
              "interior of large outline cyan diamond at bottom left"]
    e = aggregate(inside, silent=["edge of large solid red circle at top left", "empty plain dark background at top left"])
    assert e.text() == "interior of an object" and names_exactly(e, "part:interior")  # interiors are large


def test_satisfies_reads_descriptions_with_what_the_world_implies():
    from explain.aggregate import about_no_object, satisfies

    assert satisfies("large red letter k at top right", parse("a solid object")) is True
    assert satisfies("edge of small striped red circle at top left", parse("a red object")) is True
    assert satisfies("edge of small striped red circle at top left", parse("a large red object")) is False
    assert satisfies("zzz", parse("a red object")) is None and satisfies("small red circle", Explanation()) is False
    ctx = parse("empty background at top right ; the image also holds a red object")
    assert satisfies("empty plain light background at top right", ctx, "small red circle at top left") is True
    assert satisfies("empty plain light background at top right", ctx, "small blue circle at top left") is False
    assert about_no_object(parse("something at top left")) and about_no_object(parse("empty dark background"))
    assert not about_no_object(parse("edge of an object")) and not about_no_object(parse("a red object"))

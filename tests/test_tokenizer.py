"""The pure-Python tokenizer against the coco-caption toolkit's Java PTB tokenizer.

Expected token lists below are what the toolkit's PTBTokenizer (Stanford CoreNLP 3.4.1,
-preserveLines -lowerCase, then its punctuation filter) produces; when Java is installed the
tests also ask the Java tokenizer itself.
"""
import json
import shutil
import time
from pathlib import Path

import pytest

from captioner.data import tokenizer as T
from captioner.data.tokenizer import PUNCTUATIONS, tokenize, tokenize_lines

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="needs Java")

NBSP = "\u00a0"
CASES = [
    ("A man's dog sits on the couch.", ["a", "man", "'s", "dog", "sits", "on", "the", "couch"]),
    ("Don't do it, I can't and won't!", ["do", "n't", "do", "it", "i", "ca", "n't", "and", "wo", "n't"]),
    ("A boy in a t-shirt and a 3-year-old girl.",
     ["a", "boy", "in", "a", "t-shirt", "and", "a", "3-year-old", "girl"]),
    ("He cannot go; she's gonna wanna stay.",
     ["he", "can", "not", "go", "she", "'s", "gon", "na", "wan", "na", "stay"]),
    # Lowercasing comes after PTB escaping, so the toolkit's "-LRB-" filter never fires.
    ("A man (in a hat) eats {pizza} [here].",
     ["a", "man", "-lrb-", "in", "a", "hat", "-rrb-", "eats", "-lcb-", "pizza", "-rcb-", "-lsb-", "here",
      "-rsb-"]),
    ("A sign for St. Louis, Mo. and the U.S. Army at 5 p.m. today",
     ["a", "sign", "for", "st.", "louis", "mo.", "and", "the", "u.s.", "army", "at", "5", "p.m.", "today"]),
    ("It costs $5.00 or 1,000 yen at 10:30 on 12/25/2013, 50% off.",
     ["it", "costs", "$", "5.00", "or", "1,000", "yen", "at", "10:30", "on", "12/25/2013", "50", "%", "off"]),
    ("\"Hello,\" he said 'quietly' to ``them''.", ["hello", "he", "said", "quietly", "to", "them"]),
    ("A dog's bone and the dogs' bones.", ["a", "dog", "'s", "bone", "and", "the", "dogs", "bones"]),
    ("Wait... what?! No!!", ["wait", "what", "?!", "no", "!!"]),  # "?!" is not in the toolkit's list
    ("A 5 1/2 inch sandwich and a 555 555 1234 sign",
     ["a", f"5{NBSP}1/2", "inch", "sandwich", "and", "a", f"555{NBSP}555{NBSP}1234", "sign"]),
    ("A can of vitamin C.", ["a", "can", "of", "vitamin", "c."]),
    ("Sign no. 5 says no.", ["sign", "no.", "5", "says", "no"]),
    ("A grey colour theatre.", ["a", "grey", "colour", "theatre"]),  # no americanization in 3.4.1
    ("e-mail foo@bar.com or visit www.google.com.",
     ["e-mail", "foo@bar.com", "or", "visit", "www.google.com"]),
    ("Learning C++ and c# :)", ["learning", "c++", "and", "c#", ":-rrb-"]),
    ("The man\u2019s \u201cquoted\u201d words \u2014 and more\u2026",
     ["the", "man", "'s", "quoted", "words", "and", "more"]),
    ("A DOG'S BONE. CAN'T STOP!", ["a", "dog", "'s", "bone", "ca", "n't", "stop"]),
    ("It's 10 o'clock, y'all.", ["it", "'s", "10", "o'clock", "y'", "all"]),
    ("Rock 'n' roll in the '90s.", ["rock", "'n'", "roll", "in", "the", "'90s"]),
    ("  A  man\twith\nline breaks  ", ["a", "man", "with", "line", "breaks"]),
    ("", []),
    ("... !", []),
    ("A stop light has a blue sign with a P.", ["a", "stop", "light", "has", "a", "blue", "sign", "with", "a", "p."]),
]


@pytest.mark.parametrize("text,expected", CASES)
def test_tricky_strings(text, expected):
    assert tokenize(text) == expected


def test_tokenize_lines_matches_tokenize_and_sees_the_next_caption():
    texts = [text for text, _ in CASES]
    assert tokenize_lines(texts) == [expected for _, expected in CASES]
    # The Java tokenizer reads a caption's end together with the next caption's start: a final
    # single letter loses its period before a caption starting "A ...".
    assert tokenize_lines(["A sign with a P.", "A man"]) == [["a", "sign", "with", "a", "p"], ["a", "man"]]
    assert tokenize_lines(["A sign with a P.", "the man"])[0][-1] == "p."
    assert tokenize_lines([]) == []


def test_punctuation_list_is_the_toolkits():
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS as TOOLKIT

    assert PUNCTUATIONS == frozenset(TOOLKIT)


@needs_java
def test_same_as_java_on_tricky_strings():
    from captioner.evaluation.metrics import _java_tokenize_lines

    texts = [text for text, _ in CASES] + ["A stop light has a P.", "A man", "The U.S.", "The dog"]
    assert _java_tokenize_lines(texts) == tokenize_lines(texts)


def _sample_captions():
    return [text for text, _ in CASES] + [
        "a a. b. c. x-ray. ok", "No. 5, fig. 3 and Jan. 12", "etc. and so on etc.", "dog.A cat", "Mr. T",
        "the U.S. The end", "5. . . 6", ". . . x", "12.jpg and file.txt.", "<b>bold</b> and <a href='x'>",
        "o'o d'Avignon O'Neil ma'am", "AT&T and S&P-500 and R&D", "a-U.S. non-U.S. U.S.-U.K.", "''d \"x\" '",
        "cannot. gonna, wanna! lemme? gimme: gotta;", "#tag1 @user a@b.c 2-3 -5 +5 .5", "\u00bd \u00a3 \u20ac \u00a2",
    ]


def test_fast_paths_change_nothing():
    for text in _sample_captions():
        line = T.as_line(text)
        slow = T._finish(T._lex(line + "\n", fast=False))
        assert tokenize(text) == slow, text
        assert T._lex(line) == T._lex(line, fast=False), text


def test_deterministic_and_fast():
    # Typical captions: plain words, a final period, now and then a comma, "'s" or a number.
    subjects = ["A man", "Two women", "A brown dog", "The little girl", "A group of people", "A cat"]
    actions = ["riding a horse", "sitting on a bench", "playing with a frisbee", "standing in the snow"]
    places = ["on the beach.", "in a park", "next to a red car.", "at the man's house.", "with 2 dogs, outside."]
    captions = [f"{s} {a} {p}" for s in subjects for a in actions for p in places] * 40  # 4800
    start = time.perf_counter()
    first = [tokenize(c) for c in captions]
    elapsed = time.perf_counter() - start
    assert first == [tokenize(c) for c in captions]
    assert first[0] == ["a", "man", "riding", "a", "horse", "on", "the", "beach"]
    assert elapsed < 5.0  # about 0.05 s on an idle core; generous for busy shared machines


def _corpus():
    coco = DATA / "coco-caption"
    flickr = DATA / "flickr8k" / "Flickr8k.token.txt"
    if not (coco / "captions_val2014.json").exists() or not flickr.exists():
        pytest.skip("COCO val2014 / Flickr8k captions not available")
    captions = [a["caption"] for a in json.loads((coco / "captions_val2014.json").read_text())["annotations"]]
    captions += [r["caption"] for r in json.loads((coco / "captions_val2014_fakecap_results.json").read_text())]
    with open(flickr, encoding="utf-8") as f:
        captions += [line.rstrip("\n").split("\t", 1)[1] for line in f]
    return captions


@pytest.mark.slow
@needs_java
def test_same_as_java_on_coco_val2014_and_flickr8k():
    from captioner.evaluation.metrics import _java_tokenize_lines

    captions = _corpus()
    java = _java_tokenize_lines(captions)
    assert tokenize_lines(captions) == java
    per_caption = sum(tokenize(c) != j for c, j in zip(captions, java))
    assert per_caption <= 5  # only a final "X." before a caption starting "A ..." can differ

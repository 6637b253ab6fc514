"""Caption tokenizer: a pure-Python port of the coco-caption toolkit's tokenization.

The toolkit (``pycocoevalcap.tokenizer.ptbtokenizer.PTBTokenizer``) runs Stanford CoreNLP 3.4.1's
``PTBTokenizer -preserveLines -lowerCase`` over the captions and then drops a fixed list of
punctuation tokens. Metric values depend on the exact token lists, so ``tokenize`` reproduces that
pipeline rather than approximating it: the Java tokenizer is a JFlex lexer (longest match wins,
ties go to the earlier rule), and ``_RULES`` below are its rules in its priority order. They follow
CoreNLP's PTBLexer.flex grammar (GPL; only its behaviour is reimplemented here), pinned down to
what the 3.4.1 jar shipped with pycocoevalcap actually does by comparing token lists: all of COCO
val2014 and Flickr8k, and a few hundred thousand generated strings for the rules captions rarely
reach.

Deliberately kept quirks of the Java tokenizer, because the toolkit's scores depend on them:
- ``-lowerCase`` lowercases after PTB escaping, so brackets come out as ``-lrb-``/``-rrb-``/...,
  which the toolkit's (upper-case) punctuation list never removes: they stay as tokens.
- Some abbreviations keep their period (``st.``, ``dr.``, ``u.s.``, single letters like ``a.``),
  and a few words are split (``cannot`` -> ``can not``, ``gonna`` -> ``gon na``).
- Tokens from a few multi-part rules (``5 1/2``, phone numbers) contain a non-breaking space.
"""
from __future__ import annotations

import functools
import re
import unicodedata
from typing import Callable, Optional, Sequence

__all__ = ["tokenize", "tokenize_lines", "as_line", "PUNCTUATIONS"]

# The toolkit's list, compared after lowercasing (so the -XXB- entries never match anything).
PUNCTUATIONS = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                          ".", "?", "!", ",", ":", "-", "--", "...", ";"])

# ---------------------------------------------------------------------------------------------
# Character classes and building blocks (JFlex macros). JFlex's %caseless makes literal text
# case-insensitive but leaves character classes alone, hence the explicit (?i:...) groups.
# ---------------------------------------------------------------------------------------------
_SPACE_CHARS = " \t\u00a0\u2000-\u200a\u3000"
_NEWLINE_CHARS = "\r\n\u2028\u2029\u000b\u000c\u0085"
SPACE = f"[{_SPACE_CHARS}]"
SPACES = f"{SPACE}+"
SPACENL = f"[{_SPACE_CHARS}{_NEWLINE_CHARS}]"
SPACENLS = f"{SPACENL}+"


def _numeric_non_digits() -> str:
    """A character class body of what Python's \\w has but Java counts as neither letter nor digit.

    (Number characters such as ½ or ², Unicode categories No and Nl.)
    """
    codes = [cp for cp in range(0x10000) if unicodedata.category(chr(cp)) in ("No", "Nl")]
    ranges: list[list[int]] = []
    for cp in codes:
        if ranges and ranges[-1][1] == cp - 1:
            ranges[-1][1] = cp
        else:
            ranges.append([cp, cp])
    return "".join(f"\\u{a:04x}-\\u{b:04x}" if b > a else f"\\u{a:04x}" for a, b in ranges)


_NUMERIC = _numeric_non_digits()
ALPHA = rf"[^\W\d_{_NUMERIC}]"  # a letter (Java Character.isLetter)
ALNUM = rf"[^\W_{_NUMERIC}]"  # a letter or a digit
DIGIT = r"\d"
SPLET = r"&[aeiouAEIOU](?i:acute|grave|uml);"
# Letters plus the soft hyphen and combining marks / modifier letters that Java does not class as
# letters but PTBLexer lets into words.
_EXTRA_LETTERS = ("\u00ad\u0237-\u024f\u02c2-\u02c5\u02d2-\u02df\u02e5-\u02ff\u0300-\u036f"
                  "\u0370-\u037d\u0384\u0385\u03cf\u03f6\u03fc-\u03ff\u0483-\u0487\u04cf"
                  "\u04f6-\u04ff\u0510-\u0525\u055a-\u055f\u0591-\u05bd\u05bf\u05c1\u05c2\u05c4"
                  "\u05c5\u05c7\u0615-\u061a\u063b-\u063f\u064b-\u065e\u0670\u06d6-\u06ef"
                  "\u06fa-\u06ff\u070f\u0711\u0730-\u074f\u0750-\u077f\u07a6-\u07b1\u07ca-\u07f5"
                  "\u07fa\u0900-\u0903\u093c\u093e-\u094e\u0951-\u0955\u0962-\u0963\u0981-\u0983"
                  "\u09bc-\u09c4\u09c7\u09c8\u09cb-\u09cd\u09d7\u09e2\u09e3\u0a01-\u0a03\u0a3c"
                  "\u0a3e-\u0a4f\u0a81-\u0a83\u0abc-\u0acf\u0b82\u0bbe-\u0bc2\u0bc6-\u0bc8"
                  "\u0bca-\u0bcd\u0c01-\u0c03\u0c3e-\u0c56\u0d3e-\u0d44\u0d46-\u0d48\u0e30-\u0e3a"
                  "\u0e47-\u0e4e\u0eb1-\u0ebc\u0ec8-\u0ecd")
LETTER = f"(?:{ALPHA}|{SPLET}|[{_EXTRA_LETTERS}])"
WORD = rf"{LETTER}(?:{LETTER}|\d)*(?:[.!?]{LETTER}(?:{LETTER}|\d)*)*"
APOS = r"(?:['\u0092\u2019]|&apos;)"
APOSETC = r"(?:['`\u0092\u2019\u0091\u2018\u201b]|&apos;)"
REDAUX = rf"{APOS}(?:[msdMSD]|(?i:re|ve|ll))"
SWORD = r"[A-Za-z\u00ad]*[A-MO-Za-mo-z]\u00ad*"
SREDAUX = rf"(?i:n){APOSETC}(?i:t)"
NUM = rf"{DIGIT}*(?:[.:,\u00ad\u066b\u066c]{DIGIT}+)+|{DIGIT}+"
NUMBER = rf"[\-+]?(?:{NUM})"
HYPHEN = r"[\-_\u058a\u2010\u2011]"
# Python takes the first alternative that matches, JFlex the longest, so alternatives that can
# match longer come first throughout.
ACRO = (r"(?i:u\.s\.-)(?i:u\.k|u\.s\.s\.r)|(?i:canada|sino|korean|eu|japan|non)-(?i:u\.s)"
        r"|[A-Za-z](?:\.[A-Za-z])*")
ACRO2 = (r"(?i:u\.s\.-)(?i:u\.k|u\.s\.s\.r)|(?i:canada|sino|korean|eu|japan|non)-(?i:u\.s)"
         r"|[A-Za-z](?:\.[A-Za-z])+")
SGML = (r"<(?:[!?][A-Za-z\-][^>\r\n]*|/[A-Za-z][A-Za-z0-9_:.\-]*"
        r"|[A-Za-z][A-Za-z0-9_:.\-]*(?:[ ]+[A-Za-z][A-Za-z0-9_:.\-]*"
        r"(?:[ ]*=[ ]*(?:'[^'\r\n]*'|\"[^\"\r\n]*\"))?)*[ ]*/?)[ ]*>")


def _ci(words: str) -> str:
    """Alternation of literal words, case-insensitive (JFlex %caseless); '[X]' keeps X's case."""
    out = []
    for w in words.split("|"):
        m = re.fullmatch(r"\[(\w)\](.*)", w)
        out.append(f"{m.group(1)}(?i:{m.group(2)})" if m else f"(?i:{w})")
    return "(?:" + "|".join(out) + ")"


# Abbreviations, in the 3.4.1 classes (found by probing the jar with every caption word).
# ABBREV1: usually followed by lower case; before a capital/blank line they also end a sentence.
ABMONTH = "jan|feb|mar|apr|jun|jul|aug|sep|sept|oct|nov|dec"
ABDAYS = "mon|tue|tues|wed|thu|thurs|fri"
ABSTATE = ("ala|ariz|[A]z|[A]rk|calif|colo|conn|ct|dak|[D]el|fla|ga|[I]ll|ind|kans?|ky|[L]a|[M]ass|"
           "md|mich|minn|[M]iss|mo|mont|neb|nev|okla|[O]re|[P]a|penn|tenn|[T]ex|va|vt|[W]ash|wisc?|wyo")
ABCOMP = "inc|cos?|corp|pp?t[ye]s?|ltd|plc|rt|bancorp|bhd|assn|univ|intl|sys"
ABNUM = "tel|est|ext|sq"
ABPTIT = r"jr|sr|bros|(?:ed|ph)\.d|blvd|rd|esq"
ABBREV1 = (rf"(?:{_ci(ABMONTH)}|{_ci(ABDAYS)}|{_ci(ABSTATE)}|{_ci(ABCOMP)}|{_ci(ABNUM)}"
           rf"|(?i:{ABPTIT})|(?i:etc|al|seq|bldg))\.")
# ABBREV2: titles and the like, normally followed by a capitalised word; never sentence-final.
ABTITLE = ("mr|mrs|ms|[M]iss|drs?|profs?|sens?|reps?|attys?|lt|col|gen|messrs|govs?|adm|rev|maj|sgt|"
           "cpl|pvt|capt|ste?|ave|pres|lieut|hon|brig|co?mdr|pfc|spc|supts?|det|mt|ft|adj|adv|asst|"
           "assoc|ens|insp|mlle|mme|msgr|sfc")
ABCOMP2 = r"(?i:invt|elec|natl|dept)|(?i:m)[ft](?i:g)"
ABBREV4 = (rf"(?:{_ci(ABTITLE)}|(?i:vs|alex|wm|jos|cie|a\.k\.a|cf|treas|ph)|{ACRO}|{ABCOMP2})")
# ABBREV3: only an abbreviation when a number follows ("no. 5", "fig. 3").
ABBREV3 = r"(?i:ca|figs?|prop|nos?|art|bldg|pp|op)\."
# Capitalised words after which an acronym's period also ends the sentence ("U.S." "The" ->
# "U.S." "." "The"; a single letter just gives up its period: "P." "The" -> "P" "." "The").
_ACRONYM_NEXT = ("[A]bout|[A]ccording|[A]dditionally|[A]fter|[A]n|[A]|[A]s|[A]t|[B]ut|[E]arlier|"
                 "[H]e|[H]er|[H]ere|[H]owever|[I]f|[I]n|[I]t|[L]ast|[M]any|[M]ore|[M]r\\.|[M]s\\.|"
                 "[N]ow|[O]nce|[O]ne|[O]ther|[O]ur|[S]he|[S]ince|[S]o|[S]ome|[S]uch|[T]hat|[T]he|"
                 "[T]hen|[T]here|[T]hese|[T]hey|[T]his|[W]e|[W]hen|[W]hile|[W]hat|[Y]et|[Y]ou")
ACRONYM_NEXT = _ci(_ACRONYM_NEXT)

APOWORD = (rf"[A-HJ-XZn]{APOSETC}{ALPHA}{{2,}}|{ALPHA}+[aeiouyAEIOUY]{APOSETC}[aeiouA-Z]{ALPHA}*"
           rf"|(?i:nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l)"
           rf"|{APOS}(?i:n){APOS}?|[lLdDjJ]{APOS}|(?i:dunkin){APOS}|(?i:somethin){APOS}|(?i:ol){APOS}"
           rf"|{APOS}(?i:em)|{APOS}[2-9]0(?i:s)|{APOS}(?i:till?)|{APOS}(?i:cause)|(?i:o){APOSETC}(?i:o)")
FULLURL = r"(?i:https?)://[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},\-]"
LIKELYURL = (r"(?:(?i:www)\.(?:[^ \t\n\f\r\"<>|.!?(){},]+\.)+[a-zA-Z]{2,4}"
             r"|(?:[^ \t\n\f\r\"`'<>|.!?(){},-_$]+\.)+(?i:com|net|org|edu))"
             r"(?:/[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},\-])?")
EMAIL = (r"(?:(?i:&lt;)|<)?[a-zA-Z0-9][^ \t\n\f\r\"<>|()\u00a0{}]*@"
         r"(?:[^ \t\n\f\r\"<>|(){}.\u00a0]+\.)*[^ \t\n\f\r\"<>|(){}.\u00a0]+(?:(?i:&gt;)|>)?")
TWITTER = rf"@[a-zA-Z_][a-zA-Z_0-9]*|#{LETTER}+"
FILENAME = (rf"{ALNUM}+(?:\.{ALNUM}+)*\.(?i:bat|bmp|c|class|cgi|cpp|dll|doc|docx|exe|gif|gz|h|htm|html|jar"
            r"|java|jpeg|jpg|mov|mp3|pdf|php|pl|png|ppt|ps|py|sql|tar|txt|wav|x|xml|zip)")
DATE = rf"{DIGIT}{{1,2}}[\-/]{DIGIT}{{1,2}}[\-/]{DIGIT}{{2,4}}"
SUBSUPNUM = "[\u207a\u207b\u208a\u208b]?(?:[\u2070\u00b9\u00b2\u00b3\u2074-\u2079]+|[\u2080-\u2089]+)"
FRAC = rf"(?:{DIGIT}{{1,4}}[\- \u00a0])?{DIGIT}{{1,4}}(?:\\?/|\u2044){DIGIT}{{1,4}}"
FRAC2 = "[\u00bc\u00bd\u00be\u2153-\u215e]"
TBSPEC = (rf"-(?i:rrb|lrb|rcb|lcb|rsb|lsb)-|(?i:c\.d\.s|pro-|anti-|s(?:&|&amp;)p-500|s(?:&|&amp;)ls)"
          rf"|(?i:cap){APOS}(?i:n)|(?i:c){APOS}(?i:est)")
THING3 = r"[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}"
DOLSIGN = r"[A-Z]*\$|#"
DOLSIGN2 = "[\u00a2\u00a3\u00a4\u00a5\u0080\u20a0\u20ac\u060b\u0e3f\u20a4\uffe0\uffe1\uffe5\uffe6]"
PHONE = (r"(?:\([0-9]{2,3}\)[ \u00a0]?|(?:\+\+?)?(?:[0-9]{2,4}[\- \u00a0])?[0-9]{2,4}[\- \u00a0])"
         r"[0-9]{3,4}[\- \u00a0]?[0-9]{3,5}"
         r"|(?:(?:\+\+?)?[0-9]{2,4}\.)?[0-9]{2,4}\.[0-9]{3,4}\.[0-9]{3,5}")
DBLQUOT = r"\"|&quot;"
SMILEY = r"[<>]?[:;=][\-o*']?[()DPdpO\\{@|\[\]]"
ASIANSMILEY = (r"[\^x=~<>]\.\[\^x=~<>]|[\-\^x=~<>']_[\-\^x=~<>']|\([\-\^x=~<>'][_.]?[\-\^x=~<>']\)"
               r"|\([\^x=~<>']-[\^x=~<>'`]\)")
HTHING = rf"[A-Za-z0-9][A-Za-z0-9.,\u00ad]*(?:-(?:(?:{ACRO2})\.|[A-Za-z0-9\u00ad]+))+"
THING = (rf"(?:[dDoOlL]{APOSETC}{ALNUM})?{ALNUM}+"
         rf"(?:{HYPHEN}(?:[dDoOlL]{APOSETC}{ALNUM})?{ALNUM}+)*")
THINGA = r"[A-Z]+(?:(?:[+&]|(?i:&amp;))[A-Z]+)+"
QUOTES = (rf"''|[`\u2018\u2019\u201a\u201b\u201c\u201d\u0091\u0092\u0093\u0094\u201e\u201f"
          rf"\u2039\u203a\u00ab\u00bb]{{1,2}}|{APOS}")
LDOTS = r"\.{3,5}|(?:\.[ \u00a0]){2,4}\.|[\u0085\u2026]"
MISCSYMBOL = ("[+%&~^|\\\\\u00a6\u00a7\u00a8\u00a9\u00ac\u00ae\u00af\u00b0-\u00b3\u00b4-\u00ba\u00d7"
              "\u00f7\u0387\u05be\u05c0\u05c3\u05c6\u05f3\u05f4\u0600-\u0603\u0606-\u060a\u060c"
              "\u0614\u061b\u061e\u066a\u066d\u0703-\u070d\u07f6\u07f7\u07f8\u0964\u0965\u0e4f"
              "\u1fbd\u2016\u2017\u2020-\u2023\u2030-\u2038\u203b\u203e-\u2042\u2044\u207a-\u207f"
              "\u208a-\u208e\u2100-\u214f\u2190-\u21ff\u2200-\u2bff\u3012\u30fb\uff01-\uff0f"
              "\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65]")
INSENTP = "[,;:\u3001]"
SENTEND = rf"{SPACENL}(?:{SGML}|{SPACENL}|[A-Z])"


# ---------------------------------------------------------------------------------------------
# Token normalisations (what PTB3 escaping does to a matched token).
# ---------------------------------------------------------------------------------------------
def _latex_quotes(tok: str, probably_left: bool) -> str:
    if probably_left:
        tok = re.sub(r"&apos;|'", "`", tok)
        tok = re.sub(r"\"|&quot;", "``", tok)
    else:
        tok = re.sub(r"&apos;|'", "'", tok)
        tok = re.sub(r"\"|&quot;", "''", tok)
    tok = re.sub("[\u0091\u2018\u201b\u2039]", "`", tok)
    tok = re.sub("[\u0092\u2019\u203a]", "'", tok)
    tok = re.sub("[\u0093\u201c\u00ab]", "``", tok)
    return re.sub("[\u0094\u201d\u00bb]", "''", tok)


def _right_quote(tok: str) -> str:
    return _latex_quotes(tok, False)


def _left_quote(tok: str) -> str:
    return _latex_quotes(tok, True)


def _no_soft_hyphens(tok: str) -> str:
    return tok.replace("\u00ad", "") or "-"


def _amp(tok: str) -> str:
    return re.sub(r"(?i:&amp;)", "&", tok)


def _nbsp(tok: str) -> str:
    return tok.replace(" ", "\u00a0")


def _phone(tok: str) -> str:
    return _nbsp(tok).replace("(", "-LRB-").replace(")", "-RRB-")


def _parens(tok: str) -> str:
    return tok.replace("(", "-LRB-").replace(")", "-RRB-")


_FRACTIONS = {"\u00bc": "1/4", "\u00bd": "1/2", "\u00be": "3/4", "\u2153": "1/3", "\u2154": "2/3"}


def _fraction(tok: str) -> str:
    return _FRACTIONS.get(tok, tok)


def _currency(tok: str) -> str:
    tok = tok.replace("\u00a2", "cents").replace("\u00a3", "#")
    return re.sub("[\u0080\u00a4\u20a0\u20ac]", "$", tok)


def _const(value: str) -> Callable[[str], str]:
    return lambda tok: value


def _keep(tok: str) -> str:
    return tok


_SKIP = None  # action for text that produces no token (spaces, control characters)


class _Rule:
    """One lexer rule: ``pattern`` (the token) optionally followed by a trailing ``context``.

    The context counts towards the match length (as in JFlex) but is not part of the token.
    ``pushback`` characters of the token go back to the input (JFlex yypushback); ``then_period``
    re-lexes the token's final period as its own token ("etc." before a capital gives "etc." ".");
    ``acronym`` is the same trick, except that a single letter gives back its period ("I." ".").
    """

    __slots__ = ("name", "pattern", "context", "action", "pushback", "strip_spaces",
                 "then_period", "acronym")

    def __init__(self, name: str, pattern: str, action: Optional[Callable[[str], str]] = _keep,
                 context: Optional[str] = None, pushback: int = 0, strip_spaces: bool = False,
                 then_period: bool = False, acronym: bool = False):
        self.name = name
        self.pattern = pattern
        self.context = context
        self.action = action
        self.pushback = pushback
        self.strip_spaces = strip_spaces
        self.then_period = then_period
        self.acronym = acronym


# In JFlex priority order: the longest match wins, the earlier rule breaks ties.
_RULES = [
    _Rule("prog_langs", r"(?i:c\+\+|[cf]#)"),
    _Rule("assim3", rf"(?i:cannot)|{APOS}(?i:twas)", pushback=3),
    _Rule("assim2", rf"{APOS}(?i:tis)|(?i:gonna|gotta|lemme|gimme|wanna)", pushback=2),
    _Rule("sgml", SGML, _nbsp),
    _Rule("spmdash", r"&(?i:md|mdash|ndash);|[\u0096\u0097\u2013\u2014\u2015]", _const("--")),
    _Rule("spamp", r"(?i:&amp;)", _amp),
    _Rule("sppunc", r"&(?i:ht|tl|ur|lr|qc|ql|qr|odq|cdq|#[0-9]+);"),
    _Rule("word_redaux", WORD, _no_soft_hyphens, context=REDAUX),
    _Rule("sword_sredaux", SWORD, _no_soft_hyphens, context=SREDAUX),
    _Rule("word", WORD, _no_soft_hyphens),
    _Rule("apoword", APOWORD),
    _Rule("apoword2", rf"(?i:y){APOS}", context=ALPHA),
    _Rule("fullurl", FULLURL),
    _Rule("likelyurl", LIKELYURL),
    _Rule("email", EMAIL),
    _Rule("twitter", TWITTER),
    _Rule("redaux_ctx", REDAUX, _right_quote, context="[^A-Za-z]"),
    _Rule("sredaux", SREDAUX, _right_quote),
    _Rule("date", DATE),
    _Rule("number", NUMBER, _no_soft_hyphens),
    _Rule("subsupnum", SUBSUPNUM),
    _Rule("frac", FRAC, _nbsp),
    _Rule("frac2", FRAC2, _fraction),
    _Rule("tbspec", TBSPEC, _amp),
    _Rule("thing3", THING3),
    _Rule("dolsign", DOLSIGN),
    _Rule("dolsign2", DOLSIGN2, _currency),
    _Rule("acronym", rf"(?:{ACRO})\.", context=rf"{SPACENLS}(?:{ACRONYM_NEXT}|{SGML}){SPACENL}",
          strip_spaces=True, acronym=True),
    _Rule("abbrev3", ABBREV3, context=rf"{SPACENL}?{DIGIT}", strip_spaces=True),
    _Rule("abbrev1_sentend", ABBREV1, context=SENTEND, then_period=True),
    _Rule("abbrev1", ABBREV1, context="[\\s\\S][\\s\\S]"),
    _Rule("abbrev1_eof", ABBREV1, then_period=True),
    _Rule("abbrev2", rf"{ABBREV4}\."),
    _Rule("abbrev4", ABBREV4, context=SPACE),
    _Rule("acro", ACRO, context=SPACENL),
    _Rule("tbspec2", rf"{APOS}[0-9][0-9]", context=SPACENL),
    _Rule("filename", FILENAME, context=rf"{SPACENL}|[.?!,]"),
    _Rule("word_period", rf"{WORD}\.", _no_soft_hyphens, context=INSENTP),
    _Rule("phone", PHONE, _phone),
    _Rule("dblquot_left", DBLQUOT, _left_quote, context="[A-Za-z0-9$]"),
    _Rule("dblquot", DBLQUOT, _right_quote),
    _Rule("del", "\u007f", _SKIP),
    _Rule("lessthan", r"<|(?i:&lt;)", _const("<")),
    _Rule("greaterthan", r">|(?i:&gt;)", _const(">")),
    _Rule("smiley", SMILEY, _parens, context="[^A-Za-z0-9]"),
    _Rule("asiansmiley", ASIANSMILEY, _parens),
    _Rule("lcb", r"\{", _const("-LCB-")),
    _Rule("rcb", r"\}", _const("-RCB-")),
    _Rule("lsb", r"\[", _const("-LSB-")),
    _Rule("rsb", r"\]", _const("-RSB-")),
    _Rule("lrb", r"\(", _const("-LRB-")),
    _Rule("rrb", r"\)", _const("-RRB-")),
    _Rule("hyphens", r"-+", lambda tok: "--" if 3 <= len(tok) <= 4 else tok),
    _Rule("ldots", LDOTS, _const("...")),
    _Rule("fnmarks", r"@+|#+|_+"),
    _Rule("asts", r"\*+|(?:\\\*){1,3}"),
    _Rule("insentp", INSENTP),
    _Rule("qmarks", r"[?!]+"),
    _Rule("period", "[.\u00a1\u00bf\u037e\u0589\u061f\u06d4\u0700-\u0702\u07fa\u3002]"),
    _Rule("equals", r"="),
    _Rule("slash", r"/"),
    _Rule("hthing_period", rf"(?:{HTHING})\.", _no_soft_hyphens, context=INSENTP),
    _Rule("hthing", HTHING, _no_soft_hyphens),
    _Rule("thing_period", rf"(?:{THING})\.", context=INSENTP),
    _Rule("thing", THING),
    _Rule("thinga_period", rf"(?:{THINGA})\.", _amp, context=INSENTP),
    _Rule("thinga", THINGA, _amp),
    _Rule("quote_left", "'", _left_quote, context=r"[A-Za-z][^ \t\n\r\u00a0]"),
    _Rule("redaux", REDAUX, _right_quote),
    _Rule("quotes", QUOTES, _right_quote),
    _Rule("fakeduckfeet", r"<<|>>"),
    _Rule("miscsymbol", MISCSYMBOL),
    _Rule("space", f"\\x00|{SPACES}|[\u200b\u200e\u200f\ufeff]", _SKIP),
    _Rule("newline", f"[{_NEWLINE_CHARS}]", _SKIP),
    _Rule("nbsp_entity", r"(?i:&nbsp;)", _SKIP),
    _Rule("other", r"[\s\S]", _SKIP),  # untokenizable: Java deletes it (and logs a warning)
]


# All rules are tried in one regex call: each sits in an optional lookahead with its own group, so
# a single match at a position reports every rule's match there; the longest one wins.
_MASTER = re.compile("".join(
    f"(?:(?=(?P<r{i}>(?P<t{i}>{rule.pattern})(?:{rule.context or ''})))|)"
    for i, rule in enumerate(_RULES)))
_GROUPS = [(_MASTER.groupindex[f"r{i}"], _MASTER.groupindex[f"t{i}"], rule)
           for i, rule in enumerate(_RULES)]

# Fast paths. Most caption text is plain words, hyphenated words and single punctuation marks
# between spaces; in those spots no rule can beat the obvious token (every longer match needs
# some other character), so they skip the rule match. Words that some rule splits or that may be
# abbreviations ("st.", "a.", "no. 5") always take the full rule match.
_SPACE_OR_NEWLINE = frozenset(" \t\u00a0\u3000" + "".join(map(chr, range(0x2000, 0x200b))) + _NEWLINE_CHARS)
_NEWLINES = frozenset(_NEWLINE_CHARS)
_PLAIN_WORD = re.compile(r"[A-Za-z]+(?:-[A-Za-z]+)*")
_SPLIT_WORDS = frozenset(["cannot", "gonna", "gotta", "lemme", "gimme", "wanna"])
_MAY_BE_ABBREVIATION = re.compile(rf"(?:{ABBREV1}|{ABBREV4}\.|{ABBREV3})")
_LONE_PUNCT = frozenset(".,;:?!")


def _ends_at(text: str, pos: int) -> bool:
    """Whether a token ending at ``pos`` is followed by the end of text or a space/line break."""
    return pos == len(text) or text[pos] in _SPACE_OR_NEWLINE


@functools.lru_cache(maxsize=1 << 16)
def _may_be_abbreviation(word_and_period: str) -> bool:
    return _MAY_BE_ABBREVIATION.fullmatch(word_and_period) is not None


def _fast_token(text: str, pos: int) -> Optional[str]:
    """The token at ``pos`` when it is one of the easy cases, else None."""
    ch = text[pos]
    if ch in _LONE_PUNCT:
        if not _ends_at(text, pos + 1):
            return None
        if ch == "." and text.startswith((" .", "\u00a0."), pos + 1):  # maybe ". . ."
            return None
        return ch
    m = _PLAIN_WORD.match(text, pos)
    if m is None:
        return None
    word, end = m[0], m.end()
    if word.lower() in _SPLIT_WORDS:
        return None
    if _ends_at(text, end):
        return word
    if text[end] in _LONE_PUNCT and _ends_at(text, end + 1):
        if text[end] == "." and _may_be_abbreviation(text[pos:end + 1]):
            return None
        return word
    return None


def _lex(text: str, pos: int = 0, to_line_end: bool = False, fast: bool = True) -> list[str]:
    """PTB tokens (PTB3-escaped, original case) from ``pos``, as PTBLexer 3.4.1 emits them.

    Lexes to the end of the text, or with ``to_line_end`` to the end of the line: no token spans
    a line break, so a line lexed on its own comes out as it does inside the whole text (the text
    after it still counts as trailing context). ``fast=False`` turns the fast paths off, for
    testing that they change nothing.
    """
    tokens: list[str] = []
    n = len(text)
    while pos < n:
        ch = text[pos]
        if ch in _SPACE_OR_NEWLINE:
            if to_line_end and ch in _NEWLINES:
                break
            pos += 1
            continue
        tok = _fast_token(text, pos) if fast else None
        if tok is not None:
            tokens.append(tok)
            pos += len(tok)
        else:
            pos = _lex_one(text, pos, tokens)
    return tokens


def _lex_one(text: str, pos: int, tokens: list[str]) -> int:
    """Lex the token at ``pos`` (appending it, if it makes one); returns where lexing resumes."""
    regs = _MASTER.match(text, pos).regs
    best_len, best_rule, tok_end = 0, None, pos
    for group, tok_group, rule in _GROUPS:
        start, end = regs[group]
        if start >= 0 and end - pos > best_len:
            best_len, best_rule, tok_end = end - pos, rule, regs[tok_group][1]
    rule = best_rule
    tok = text[pos:tok_end]
    if rule.strip_spaces:  # PTBLexer's workaround for a JFlex trailing-context bug
        tok = tok.rstrip(" \t\n\x0b\x0c\r\x85")
    if rule.pushback:
        tok = tok[:-rule.pushback]
    next_pos = pos + len(tok)
    if rule.acronym and len(tok) == 2:  # "I." before "The": the letter, then the period
        tok = tok[:1]
        next_pos = pos + 1
    elif rule.then_period or rule.acronym:
        next_pos -= 1
    if rule.action is not None:
        tokens.append(rule.action(tok))
    return next_pos


# Whole-caption fast path: most captions are only plain (or hyphenated) words, each perhaps
# followed by one punctuation mark, and lone punctuation marks, between spaces. Unless a word is
# one that some rule splits or may be an abbreviation before its period, their tokens are simply
# the words (the marks are all dropped), and nothing around the caption can change that.
_EASY_CAPTION = re.compile(r" *(?:(?:[A-Za-z]+(?:-[A-Za-z]+)*[.,;:?!]?|[.,;:?!])(?: +|\Z))*")
_EASY_WORDS = re.compile(r"[a-z]+(?:-[a-z]+)*")
_WORD_BEFORE_PERIOD = re.compile(r"[A-Za-z-]+\.")
_SPLIT_WORD = re.compile("|".join(sorted(_SPLIT_WORDS)))


def _easy_tokens(caption: str) -> Optional[list[str]]:
    if _EASY_CAPTION.fullmatch(caption) is None:
        return None
    lowered = caption.lower()
    if _SPLIT_WORD.search(lowered):
        return None
    if "." in caption:
        for word in _WORD_BEFORE_PERIOD.findall(caption):
            if _may_be_abbreviation(word):
                return None
    return _EASY_WORDS.findall(lowered)


def _finish(tokens: list[str]) -> list[str]:
    """Lowercase (-lowerCase) and drop the toolkit's punctuation tokens."""
    out = []
    for tok in tokens:
        tok = tok.lower()
        if tok not in PUNCTUATIONS:
            out.append(tok)
    return out


# Java breaks lines at all of these; the toolkit only replaces "\n" in captions, so any other one
# would shift every following caption onto the wrong image. They are spaces here.
_LINE_BREAKS_TO_SPACES = str.maketrans({c: " " for c in _NEWLINE_CHARS})


def as_line(caption: str) -> str:
    """The caption as one line of the toolkit's tokenizer input (its line breaks as spaces)."""
    return caption.translate(_LINE_BREAKS_TO_SPACES)


def tokenize(text: str) -> list[str]:
    """Lowercased PTB tokens of one caption, without the punctuation the toolkit drops.

    This is the coco-caption toolkit's ``PTBTokenizer`` output for the caption, split on spaces
    (``" ".join(tokenize(c))`` is the toolkit's string). The one thing a lone caption cannot
    reproduce is the Java tokenizer looking past the end of a caption into the next one (a final
    "P." loses its period when the next caption starts with "A "); ``tokenize_lines`` does that.
    """
    text = as_line(text)
    easy = _easy_tokens(text)
    if easy is not None:
        return easy
    return _finish(_lex(text + "\n"))  # a line of the toolkit's file: a line break follows


def tokenize_lines(captions: Sequence[str]) -> list[list[str]]:
    """``tokenize`` for each caption, exactly as the toolkit tokenizes a list of captions.

    The toolkit writes the captions one per line and tokenizes the file in one go, so the end of
    a caption can see the start of the next one.
    """
    lines = [as_line(c) for c in captions]
    text = "\n".join(lines)
    out, start = [], 0
    for line in lines:
        easy = _easy_tokens(line)
        out.append(easy if easy is not None else _finish(_lex(text, start, to_line_end=True)))
        start += len(line) + 1
    return out

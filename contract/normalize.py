"""French text normalization applied to references and hypotheses before scoring WER/CER.

Follows the French reference normalizer of the base model's author: lowercase, accents kept,
apostrophes unified to ' and KEPT ATTACHED ("l'homme" is one word, on both sides), numbers
written out in French words, œ -> oe, æ -> ae, M./Mme/Mlle expanded, punctuation and hyphens
turned into spaces (so "vingt-et-un", "vingt et un" and "21" all read "vingt et un"),
bracketed annotations ([rires], <unk>) dropped, whitespace collapsed.

Both sides score with it: the evaluate step on the machine, and the orchestrator when it
re-scores the machine's transcripts at home (tasks/verdict.py).
"""
from __future__ import annotations

import re
import unicodedata

UNITS = ["zéro", "un", "deux", "trois", "quatre", "cinq", "six", "sept", "huit", "neuf", "dix",
         "onze", "douze", "treize", "quatorze", "quinze", "seize"]
TENS = {2: "vingt", 3: "trente", 4: "quarante", 5: "cinquante", 6: "soixante"}
MAX_NUMBER = 999_999_999


def _below_100(n: int, plural: bool = True) -> str:
    if n <= 16:
        return UNITS[n]
    if n < 20:
        return "dix-" + UNITS[n - 10]
    tens, unit = divmod(n, 10)
    if tens in (7, 9):  # soixante-dix.., quatre-vingt-dix..
        base = "soixante" if tens == 7 else "quatre-vingt"
        return base + (" et " if n == 71 else "-") + _below_100(10 + unit)
    if tens == 8:
        return ("quatre-vingts" if plural else "quatre-vingt") if unit == 0 else "quatre-vingt-" + UNITS[unit]
    if unit == 0:
        return TENS[tens]
    return TENS[tens] + (" et un" if unit == 1 else "-" + UNITS[unit])


def _below_1000(n: int, plural: bool = True) -> str:
    """`plural` False before "mille" (invariable): "deux cent mille", "quatre-vingt mille"."""
    hundreds, rest = divmod(n, 100)
    parts = []
    if hundreds:
        parts.append("cent" if hundreds == 1 else UNITS[hundreds] + " cent" + ("s" if rest == 0 and plural else ""))
    if rest:
        parts.append(_below_100(rest, plural))
    return " ".join(parts)


def number_to_words(n: int) -> str:
    """French cardinal for 0..999 999 999 (traditional spelling: 21 "vingt et un", 80 "quatre-vingts")."""
    if not 0 <= n <= MAX_NUMBER:
        raise ValueError(f"number_to_words handles 0..{MAX_NUMBER}, got {n}")
    if n == 0:
        return UNITS[0]
    millions, rest = divmod(n, 1_000_000)
    thousands, units = divmod(rest, 1000)
    parts = []
    if millions:
        parts.append(_below_1000(millions) + (" millions" if millions > 1 else " million"))
    if thousands:
        parts.append("mille" if thousands == 1 else _below_1000(thousands, plural=False) + " mille")
    if units:
        parts.append(_below_1000(units))
    return " ".join(parts)


def ordinal_to_words(n: int, feminine: bool = False) -> str:
    """1 -> premier/première, 2 -> deuxième, 5 -> cinquième, 80 -> quatre-vingtième."""
    if n == 1:
        return "première" if feminine else "premier"
    words = number_to_words(n)
    last = re.search(r"[^ -]+$", words)[0]
    prefix = words[: len(words) - len(last)]
    last = last[:-1] if last in ("cents", "vingts") else last
    special = {"un": "unième", "cinq": "cinquième", "neuf": "neuvième"}
    return prefix + (special.get(last) or (last[:-1] if last.endswith("e") else last) + "ième")


def _digits(s: str) -> str:
    return " ".join(UNITS[int(c)] for c in s)


def _cardinal(s: str) -> str:
    n = int(s)
    return number_to_words(n) if n <= MAX_NUMBER and not (s.startswith("0") and len(s) > 1) else _digits(s)


_TITLES = [(r"\bMM\.(?=\s)", "messieurs"), (r"\bMmes\b\.?", "mesdames"), (r"\bMme\b\.?", "madame"),
           (r"\bMlles\b\.?", "mesdemoiselles"), (r"\bMlle\b\.?", "mademoiselle"), (r"\bM\.(?=\s)", "monsieur"),
           (r"\bDr\b\.?", "docteur")]


def _numbers(text: str) -> str:
    text = re.sub(r"(?<=\d)[ \u00a0\u202f.](?=\d{3}\b)", "", text)  # 1 000 / 1.000 -> 1000
    text = re.sub(r"(\d+),(\d+)", lambda m: f"{_cardinal(m[1])} virgule {_cardinal(m[2])}", text)
    text = re.sub(r"\b(\d+)(?:er|re|ère)\b", lambda m: ordinal_to_words(int(m[1]), feminine=m[0].endswith(("re", "ère")))
                  if int(m[1]) <= MAX_NUMBER else m[0], text)
    text = re.sub(r"\b(\d+)(?:e|ème|eme|ième)\b", lambda m: ordinal_to_words(int(m[1])) if int(m[1]) <= MAX_NUMBER else m[0], text)
    text = re.sub(r"\d+", lambda m: f" {_cardinal(m[0])} ", text)
    return text


def normalize_french(text: str) -> str:
    """Normalize one transcript (reference or hypothesis) for scoring."""
    text = unicodedata.normalize("NFKC", text or "")
    # Digits outside Unicode's decimal class (e.g. Tai Tham U+19DA) are read as their digit value.
    text = "".join(str(unicodedata.digit(c)) if c.isdigit() and not c.isdecimal() else c for c in text)
    text = re.sub(r"\[[^\]]*\]|<[^>]*>", " ", text)
    for pattern, words in _TITLES:
        text = re.sub(pattern, words, text)
    text = text.lower()
    text = re.sub(r"[’‘`´ʼ′]", "'", text)
    text = text.replace("œ", "oe").replace("æ", "ae")
    text = text.replace("%", " pour cent ").replace("€", " euros ").replace("&", " et ")
    text = _numbers(text)
    text = re.sub(r"[^\w']|_", " ", text)
    text = re.sub(r"(?<!\w)'|'(?!\w)", " ", text)
    return " ".join(text.split())

"""PII redaction: e-mail addresses, phone numbers, IP addresses and card numbers become placeholders.

Regular expressions find candidates; a validator then keeps only real ones:
- e-mail: local@domain.tld (the TLD alphabetic, 2+ letters);
- card: 13-19 digits, optionally grouped by spaces or dashes, that pass the Luhn checksum;
- IP: IPv4 dotted quads with every octet <= 255 (a version such as 3.11.2 has three parts and is kept), and
  IPv6 addresses that Python's `ipaddress` accepts, with at least three written groups (so `::1` and a
  Python slice `[::2]` are kept);
- phone: 9-15 digits in groups, and one of: a leading `+country`, an area code in parentheses, a leading
  trunk `0` (040 123 4567, 090-1234-5678), or the North American 3-3-4 pattern (555-123-4567). Dates
  (2023-05-14, 14.05.2023), times, prices and years never have that shape.

Boundaries are digit- or ASCII-based, not word-based, because Japanese writes particles straight after
an address (`090-1234-5678へ`). Replacements are counted per kind (`redacted_email`, ...), in total and per
language; documents are never dropped.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter

from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.utils.typeshelper import StatHints

from quintet.data.curation.base import document_language

PLACEHOLDERS = {"email": "<EMAIL>", "card": "<CARD_NUMBER>", "ip": "<IP_ADDRESS>", "phone": "<PHONE>"}
KINDS = tuple(PLACEHOLDERS)  # also the order in which they are applied

EMAIL = re.compile(
    r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@"
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,}(?![A-Za-z0-9-])"
)
CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d])")
IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?!\d|\.\d)")
IPV6 = re.compile(r"(?<![0-9A-Za-z:.])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?![0-9A-Za-z:])")
PHONE = re.compile(
    r"(?<![\d+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{1,5}(?:[ .-]\d{1,5}){1,5}(?!\d|[.-]\d)"
)


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum: every second digit from the right doubled (minus 9 above 9), total % 10 == 0."""
    total = 0
    for i, c in enumerate(reversed(digits)):
        d = int(c)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def is_card_number(candidate: str) -> bool:
    digits = re.sub(r"[ -]", "", candidate)
    return 13 <= len(digits) <= 19 and luhn_valid(digits)


def is_ipv4(candidate: str) -> bool:
    return all(
        int(part) <= 255 and (part == "0" or not part.startswith("0")) for part in candidate.split(".")
    )


def is_ipv6(candidate: str) -> bool:
    if sum(1 for group in candidate.split(":") if group) < 3:  # not "::1" or a slice such as "::2"
        return False
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:
        return False
    return True


def is_phone_number(candidate: str) -> bool:
    digits = re.sub(r"\D", "", candidate)
    if not 9 <= len(digits) <= 15:
        return False
    if candidate.startswith(("+", "(")):
        return True
    groups = re.split(r"[ .-]", candidate)
    if candidate.startswith("0"):
        return len(groups) >= 2 and "." not in candidate
    return bool(re.fullmatch(r"\d{3}([ .-])\d{3}\1\d{4}", candidate))


_RULES = {
    "email": (EMAIL, None),
    "card": (CARD, is_card_number),
    "ip": (None, None),  # two patterns, handled in redact_pii
    "phone": (PHONE, is_phone_number),
}


def _sub(pattern: re.Pattern, valid, placeholder: str, text: str, counts: Counter, kind: str) -> str:
    def replace(match: re.Match) -> str:
        if valid is not None and not valid(match.group(0)):
            return match.group(0)
        counts[kind] += 1
        return placeholder

    return pattern.sub(replace, text)


def redact_pii(text: str, kinds: tuple[str, ...] | list[str] = KINDS) -> tuple[str, Counter]:
    """`text` with every PII item of `kinds` replaced by its placeholder, and the count per kind."""
    counts: Counter = Counter()
    for kind in KINDS:
        if kind not in kinds:
            continue
        if kind == "ip":
            text = _sub(IPV4, is_ipv4, PLACEHOLDERS["ip"], text, counts, "ip")
            text = _sub(IPV6, is_ipv6, PLACEHOLDERS["ip"], text, counts, "ip")
        else:
            pattern, valid = _RULES[kind]
            text = _sub(pattern, valid, PLACEHOLDERS[kind], text, counts, kind)
    return text, counts


class PIIRedactor(PipelineStep):
    """Replaces PII in every document's text with placeholders; counts `redacted_<kind>`."""

    type = "✂️ - FORMAT"

    def __init__(self, kinds: list[str] | tuple[str, ...] = KINDS, name: str = "pii"):
        self.name = name
        super().__init__()
        unknown = [k for k in kinds if k not in KINDS]
        if unknown:
            raise ValueError(f"pii kinds: unknown {unknown}; valid: {', '.join(KINDS)}")
        self.kinds = tuple(kinds)

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            lang = document_language(doc)
            self.stat_update("input_bytes", value=len(doc.text.encode("utf-8")))
            with self.track_time():
                doc.text, counts = redact_pii(doc.text, self.kinds)
            self.stat_update(StatHints.total, f"{lang}/{StatHints.total}", f"{lang}/{StatHints.forwarded}")
            self.stat_update(StatHints.forwarded)
            if counts:
                self.stat_update("documents_redacted", f"{lang}/documents_redacted")
                for kind, n in counts.items():
                    self.stat_update(f"redacted_{kind}", f"{lang}/redacted_{kind}", value=n)
                doc.metadata["pii_redacted"] = dict(counts)
            yield doc

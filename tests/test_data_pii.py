"""PII redaction: each regex on positive and negative examples; the Luhn checksum against its definition."""

import pytest

from quintet.data.curation.pii import is_ipv4, luhn_valid, redact_pii


@pytest.mark.parametrize(
    "text, kind",
    [
        ("write to anna.virtanen@example.com today", "email"),
        ("mail tom_smith42@mail.example.net.", "email"),
        ("詳しくはyuki.tanaka@example.co.jpまでご連絡ください。", "email"),
        ("call +1 555 123 4567 now", "phone"),
        ("call (555) 234-5678 now", "phone"),
        ("call 555-345-6789 now", "phone"),
        ("soita numeroon 040 765 4321 virka-aikana", "phone"),
        ("soita +358-44-555-0101.", "phone"),
        ("फ़ोन करें +91 98765 43210 पर", "phone"),
        ("落とし物は090-1234-5678へお電話ください。", "phone"),
        ("gọi 0912 345 678 trong giờ hành chính", "phone"),
        ("server 192.168.14.7 is down", "ip"),
        ("from 203.0.113.9.", "ip"),
        ("host 2001:db8:1a2b::3c4d is new", "ip"),
        ("card 4539 1488 0343 6467 leaked", "card"),
        ("card 5555-5555-5555-4444 leaked", "card"),
        ("card 4111111111111111 leaked", "card"),
    ],
)
def test_redacts(text, kind):
    redacted, counts = redact_pii(text)
    assert counts == {kind: 1}, (text, redacted)
    assert "<" in redacted


@pytest.mark.parametrize(
    "text",
    [
        "The meeting on 2023-05-14 starts at 14:30.",
        "Kokous pidetään 14.5.2023 kello 9:15.",
        "बैठक 14/05/2023 को होगी।",
        "Version 3.11.2 fixes several problems.",
        "Tickets cost $38.50, or 1 299,00 euroa.",
        "Vé có giá 38.000 đồng.",
        "The years 2019 2020 2021 were busy.",
        "The reference number is A-48213.",
        "A 16-digit number that fails Luhn: 4539 1488 0343 6468.",
        "An octet above 255: 300.1.2.3, and a slice x[::2].",
        "A decorator @property and a = b @ c.",
        "Loopback ::1 and a time 12:30:45.",
    ],
)
def test_keeps_lookalikes(text):
    redacted, counts = redact_pii(text)
    assert not counts, (text, redacted)
    assert redacted == text


def test_kinds_can_be_chosen():
    text = "mail a.b@example.com or call +1 555 123 4567"
    redacted, counts = redact_pii(text, kinds=["email"])
    assert counts == {"email": 1}
    assert "+1 555 123 4567" in redacted


def _luhn_reference(number: str) -> bool:
    # The textbook form: sum of digits of (digit * weight), weights 1, 2, 1, 2, ... from the right.
    total = 0
    for i, c in enumerate(reversed(number)):
        total += sum(int(d) for d in str(int(c) * (1 + i % 2)))
    return total % 10 == 0


def test_luhn_matches_reference():
    import random

    rng = random.Random(0)
    for _ in range(2000):
        number = "".join(str(rng.randint(0, 9)) for _ in range(rng.randint(12, 19)))
        assert luhn_valid(number) == _luhn_reference(number)
    assert luhn_valid("79927398713") and not luhn_valid("79927398710")


def test_ipv4_octets():
    assert is_ipv4("10.0.0.1") and is_ipv4("255.255.255.255")
    assert not is_ipv4("256.1.1.1") and not is_ipv4("01.2.3.4")

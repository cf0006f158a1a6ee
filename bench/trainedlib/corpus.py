"""A mixed-domain corpus from what Debian and Python ship: Python sources, C headers, man pages in several
languages. Each domain is a list of documents (one file each), sampled by a fixed seed, so the same
machine builds the same corpus; a domain this machine lacks is left out, and said so."""

from __future__ import annotations

import gzip
import random
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

MAN = Path("/usr/share/man")
# man pages of these languages, where installed (Debian's manpages-* and the packages' own translations)
MAN_LANGUAGES = ("en", "de", "fr", "es", "it", "pl", "cs", "ru")
_ROFF_ESCAPE = re.compile(r"\\f[BIRP]|\\\(\w\w|\\\*\w|\\[-&e|^]|\\s[-+]?\d")


@dataclass(frozen=True)
class Domain:
    name: str
    files: tuple[Path, ...]


def domains(names: tuple[str, ...] | None = None) -> list[Domain]:
    """The domains this machine has files for (at least 20 each), in a fixed order."""
    found = [Domain("python", _files(Path(sysconfig.get_paths()["stdlib"]), "*.py")),
             Domain("c", _files(Path("/usr/include"), "*.h"))]
    for lang in MAN_LANGUAGES:
        root = MAN if lang == "en" else MAN / lang
        files = tuple(f for section in ("man1", "man5", "man8") for f in _files(root / section, "*.gz"))
        found.append(Domain(f"man-{lang}", files))
    return [d for d in found if len(d.files) >= 20 and (names is None or d.name in names)]


def _files(root: Path, pattern: str) -> tuple[Path, ...]:
    if not root.is_dir():
        return ()
    return tuple(sorted(p for p in root.rglob(pattern) if p.is_file() and "test" not in p.parts))


def documents(domain: Domain, max_bytes: int, seed: int = 0, max_doc_bytes: int = 16384) -> list[str]:
    """Up to max_bytes of the domain's text, a document per file (each cut at max_doc_bytes)."""
    files = list(domain.files)
    random.Random(f"{seed}:{domain.name}").shuffle(files)
    docs, total = [], 0
    for path in files:
        text = _read(path)[:max_doc_bytes]
        if len(text) < 200:
            continue
        docs.append(text)
        total += len(text.encode())
        if total >= max_bytes:
            break
    return docs


def _read(path: Path) -> str:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
                return _plain_man(f.read())
        return path.read_text(encoding="utf-8", errors="replace")
    except (OSError, EOFError, gzip.BadGzipFile):
        return ""


def _plain_man(roff: str) -> str:
    """The prose of a man page: roff requests dropped, font escapes removed."""
    lines = []
    for line in roff.splitlines():
        if line.startswith((".", "'")):
            words = line.split(None, 1)
            if words and words[0] in (".SH", ".SS", ".B", ".I", ".BR", ".IR", ".TP", ".IP") and len(words) > 1:
                lines.append(_ROFF_ESCAPE.sub("", words[1]).replace('"', ""))
            continue
        lines.append(_ROFF_ESCAPE.sub("", line))
    return "\n".join(lines)

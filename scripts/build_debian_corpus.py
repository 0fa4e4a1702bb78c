"""Builds an offline English corpus (about 56 MB of text) from Debian documentation packages.

    python scripts/build_debian_corpus.py --output data/debian    # Debian or Ubuntu, with network
    python scripts/build_debian_corpus.py --output data/debian --package python3.11-doc=3.11.2-6+deb12u8

Downloads (apt-get download, no root needed) python3.X-doc (the reStructuredText sources of
the Python documentation), manpages and manpages-dev (rendered with groff), perl-doc (rendered
with pod2text) and jargon-text (the Jargon File, one document per entry), adds the King James
Bible shipped with rexmoe_jax, and writes:

    OUTPUT/documents.jsonl   one {"text", "source"} object per document
    OUTPUT/tokenizer.json    a byte-level BPE tokenizer trained on it (--vocab-size, 16,384)
    OUTPUT/tokens/           the corpus tokenized once, for data.corpus=OUTPUT/tokens
    OUTPUT/packages.txt      the package versions it was built from, NAME=VERSION a line

The archive moves on (security updates replace the documentation packages), so the same command
builds another corpus later; --package NAME=VERSION, once per package, asks apt for the versions
a packages.txt names, while the archive still serves them.

Then train on it with, for example:

    python train.py --workdir runs/debian data.corpus=data/debian/tokens model.vocab_size=16384
"""

from __future__ import annotations

import argparse
import gzip
import json
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rexmoe_jax import data
from rexmoe_jax.tokenizer import train_bpe


def _python_doc_package() -> str:
    """The newest python3.N-doc that apt knows about."""
    names = subprocess.run(["apt-cache", "pkgnames", "python3."], capture_output=True, text=True,
                           check=True).stdout.split()
    docs = sorted((n for n in names if re.fullmatch(r"python3\.\d+-doc", n)),
                  key=lambda n: int(n.split(".")[1].split("-")[0]))
    if not docs:
        raise SystemExit("error: apt knows no python3.N-doc package; run apt-get update first")
    return docs[-1]


def download(packages: list[str], folder: pathlib.Path) -> tuple[pathlib.Path, list[str]]:
    """The packages (NAME or NAME=VERSION) unpacked under one root, and NAME=VERSION of each."""
    subprocess.run(["apt-get", "download", *packages], cwd=folder, check=True)
    root, versions = folder / "root", []
    for deb in sorted(folder.glob("*.deb")):
        subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
        fields = subprocess.run(["dpkg-deb", "--show", "--showformat=${Package}=${Version}", str(deb)],
                                capture_output=True, text=True, check=True).stdout
        versions.append(fields.strip())
    return root, versions


def _with_pins(names: list[str], pins: list[str]) -> list[str]:
    """`names` with each NAME that a --package NAME=VERSION names replaced by that pin."""
    pinned = {}
    for pin in pins:
        name, _, version = pin.partition("=")
        if not version:
            raise SystemExit(f"error: --package {pin!r} is not NAME=VERSION (a line of a packages.txt)")
        pinned[name] = pin
    if names_unknown := sorted(set(pinned) - set(names)):
        raise SystemExit(f"error: --package names {', '.join(names_unknown)}, which this corpus does not "
                         f"use; it uses {', '.join(names)}")
    return [pinned.get(name, name) for name in names]


def python_docs(root: pathlib.Path):
    # Resolved and deduplicated: python3.N-doc is a symbolic link to python3.N.
    for path in sorted({p.resolve() for p in root.glob("usr/share/doc/python3*/html/_sources/**/*.rst.txt")}):
        yield path.read_text(encoding="utf-8", errors="replace")


def man_pages(root: pathlib.Path):
    for path in sorted(root.glob("usr/share/man/man*/*.gz")):
        source = gzip.decompress(path.read_bytes())
        if source.lstrip().startswith(b".so "):  # a redirect to another page
            continue
        rendered = subprocess.run(["groff", "-man", "-Tutf8", "-P-cbou"], input=source,
                                  capture_output=True, check=False).stdout.decode("utf-8", "replace")
        # groff indents the body by 7 columns; drop that margin, keep deeper indentation.
        lines = [re.sub(r"^ {1,7}", "", line.rstrip()) for line in rendered.splitlines()]
        if any(lines):
            yield "\n".join(lines).strip()


def perl_docs(root: pathlib.Path):
    for path in sorted(root.glob("usr/share/perl/*/pod/*.pod")):
        text = subprocess.run(["pod2text", str(path)], capture_output=True, check=False).stdout
        if text.strip():
            yield text.decode("utf-8", "replace")


def jargon_entries(root: pathlib.Path):
    """The front matter, then one document per lexicon entry (a line like "   :hacker: n.")."""
    text = gzip.decompress(next(root.glob("usr/share/doc/jargon-text/jargon.txt.gz")).read_bytes())
    text = re.sub(r"(?m)^ {1,3}", "", text.decode("utf-8", "replace"))
    entries = re.split(r"\n(?=:[^:\n]+:)", text)
    yield from (entry.strip() for entry in entries if entry.strip())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("--vocab-size", type=int, default=16_384)
    parser.add_argument("--package", action="append", default=[], metavar="NAME=VERSION",
                        help="download this version of one of the packages (repeat for several)")
    args = parser.parse_args()
    for tool in ("apt-get", "dpkg", "groff", "pod2text"):
        if shutil.which(tool) is None:
            raise SystemExit(f"error: {tool} not found; this script needs Debian or Ubuntu with groff-base and perl")
    python_doc = next((p.partition("=")[0] for p in args.package if p.startswith("python3.")), None)
    names = [python_doc or _python_doc_package(), "manpages", "manpages-dev", "perl-doc", "jargon-text"]
    packages = _with_pins(names, args.package)
    output = pathlib.Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    documents = output / "documents.jsonl"
    counts: dict[str, list[int]] = {}
    with tempfile.TemporaryDirectory() as tmp, open(documents, "w", encoding="utf-8") as out:
        root, versions = download(packages, pathlib.Path(tmp))
        sources = [("python-docs", python_docs(root)), ("man-pages", man_pages(root)),
                   ("perl-docs", perl_docs(root)), ("jargon-file", jargon_entries(root)),
                   ("kjv-bible", iter(data.read_embedded_documents()))]
        for name, texts in sources:
            for text in texts:
                out.write(json.dumps({"text": text, "source": name}) + "\n")
                counts.setdefault(name, []).append(len(text.encode("utf-8")))
    (output / "packages.txt").write_text("".join(v + "\n" for v in versions))
    print("built from", ", ".join(versions))
    for name, sizes in counts.items():
        print(f"{name:12s} {len(sizes):6,d} documents {sum(sizes) / 1e6:6.1f} MB")
    print(f"{'total':12s} {sum(map(len, counts.values())):6,d} documents "
          f"{sum(map(sum, counts.values())) / 1e6:6.1f} MB in {documents}")
    with open(documents, encoding="utf-8") as f:
        train_bpe((json.loads(line)["text"] for line in f), args.vocab_size, output / "tokenizer.json")
    meta = data.prepare(str(documents), str(output / "tokenizer.json"), output / "tokens")
    print(f"tokenizer {output / 'tokenizer.json'} ({args.vocab_size:,} tokens); "
          f"{meta['num_tokens']:,} tokens in {output / 'tokens'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Rebuilds the corpus and tokenizer shipped in rexmoe_jax/assets/ from Debian's KJV packages.

    python scripts/build_embedded_corpus.py        # needs apt-get (Debian/Ubuntu) and network

Downloads bible-kjv (the `bible` program) and bible-kjv-text (its compressed text) with
`apt-get download`, unpacks them into a temporary folder, prints the whole King James Bible
(public domain) and writes one document per chapter ("Genesis 1", then one verse per line),
documents separated by a blank line, to assets/kjv.txt.gz. Then trains the 4,096-token
byte-level BPE tokenizer on it and saves assets/tokenizer.json. Run once by a maintainer;
training never runs it.
"""

from __future__ import annotations

import gzip
import pathlib
import re
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rexmoe_jax import tokenizer

ASSETS = ROOT / "rexmoe_jax" / "assets"
VOCAB_SIZE = 4096


def kjv_chapters(workdir: pathlib.Path) -> list[str]:
    subprocess.run(["apt-get", "download", "bible-kjv", "bible-kjv-text"], cwd=workdir, check=True)
    for deb in workdir.glob("*.deb"):
        subprocess.run(["dpkg", "-x", str(deb), str(workdir / "root")], check=True)
    root = workdir / "root"
    # `bible -d` wants a path relative to its search path, so run it from the unpacked root.
    text = subprocess.run(["usr/bin/bible", "-l", "1000000", "-d", "usr/lib/bible.data",
                           "gen1:1-rev22:21"], cwd=root, check=True, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL).stdout
    chapters, current = [], []
    for line in text.splitlines():
        verse = re.match(r"^\s+\d+ (.*)$", line)
        if verse:
            current.append(verse.group(1).strip())
        elif line.strip():
            if current:
                chapters.append("\n".join(current))
            current = [line.strip()]
    chapters.append("\n".join(current))
    return chapters


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        chapters = kjv_chapters(pathlib.Path(tmp))
    assert len(chapters) == 1189, f"expected 1,189 chapters, got {len(chapters)}"
    ASSETS.mkdir(parents=True, exist_ok=True)
    with gzip.open(ASSETS / "kjv.txt.gz", "wt", encoding="utf-8", compresslevel=9) as f:
        f.write("\n\n".join(chapters) + "\n")
    tokenizer.train_bpe(chapters, VOCAB_SIZE, ASSETS / "tokenizer.json")
    print(f"wrote {len(chapters)} chapters and a {VOCAB_SIZE}-token tokenizer to {ASSETS}")


if __name__ == "__main__":
    main()

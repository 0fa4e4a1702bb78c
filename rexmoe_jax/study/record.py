"""A finished run of a study, condensed into one JSON record for the results folder.

A record holds what the report needs and what a reader checking it would ask for: the
overrides and the resolved config, the corpus's identity (not its path on some machine), the
held-out loss at every evaluation, the routing over training (from metrics.jsonl) and per layer
at every evaluation (from routing.jsonl's expert loads over the full pool), the final expert
loads, N_t at every logged step, sizes, token counts, wall time, throughput and the commits
that ran it. Records are written atomically, so a reader never sees half of one.

This module reads files only and computes on the host: the JSON Lines come from
runlog.read_records, the per-layer routing from metrics.layer_routing (NumPy).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib

import numpy as np

from rexmoe_jax.data import EMBEDDED_CORPUS, held_out_documents, split_documents
from rexmoe_jax.model import metrics as metrics_lib
from rexmoe_jax.runlog import read_records
from rexmoe_jax.runtime.workdir import METRICS_FILE, ROUTING_FILE, checkpoint_steps
from rexmoe_jax.sources import PREPARED_META, corpus_files
from rexmoe_jax.study.spec import StudyError

RECORD_VERSION = 1
ATTEMPTS_FILE = "study_attempts.jsonl"  # In the run folder: one line per launch of train.py.
CORPUS_PLACEHOLDER = "<--corpus>"  # Stands for the machine's corpus path in a record's config.
_TRAIN_SERIES = ("loss", "psr_pool_size", "lbv_max", "lbv_min", "underused_share", "tokens_per_sec", "lr")
_EVAL_SERIES = ("eval_loss", "lbv_max", "underused_share", "foreign_share")


def resume_step(workdir: pathlib.Path) -> int:
    """The step train.py resumes the run from: its newest checkpoint's (0 before the first;
    train.py sets an unreadable one aside and takes the one before). The last logged step may
    be later (dropped on resume) or earlier (log_every > 1)."""
    return max(checkpoint_steps(workdir), default=0)


def is_complete(workdir: pathlib.Path, steps: int) -> bool:
    """Training reached `steps` and evaluated there (the loop always evaluates the last step)."""
    records = read_records(workdir / METRICS_FILE, warn=False)  # a live run's last line may be torn
    return any(r.get("step") == steps and "eval_loss" in r for r in records)


def write_atomic(path: pathlib.Path, record: dict) -> None:
    """Writes `record` as JSON to a temporary file beside `path`, then renames it into place:
    a crash leaves either the old file or the new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    # One top-level key per line: records stay compact but diff readably.
    body = ",\n".join(f" {json.dumps(k)}: {json.dumps(record[k], separators=(',', ':'))}" for k in sorted(record))
    partial.write_text("{\n" + body + "\n}\n")
    with open(partial, "rb") as f:
        os.fsync(f.fileno())
    os.replace(partial, path)


def load_record(path: pathlib.Path, overrides: list[str]) -> dict | None:
    """The record at `path` (None if there is none yet). A record made with other overrides
    would be silently mixed into the study: that is an error naming it."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise StudyError(f"record {path} is unreadable ({err}); move it away to re-run it") from None
    if record.get("overrides") != overrides:
        changed = sorted(set(record.get("overrides", [])) ^ set(overrides))
        raise StudyError(f"record {path} was made with other settings ({', '.join(changed)}); "
                         "move it away, or give the changed arm a new name")
    return record


def corpus_identity(corpus: str) -> dict:
    """What a record says of its corpus, so that records made on different machines can be
    checked to have trained on the same data: a prepared corpus's meta.json without paths and a
    hash of its tokens; for text or token files (and the embedded text), a hash of the files'
    names and bytes."""
    if not corpus:
        return {"name": "embedded KJV", "files_sha256": _files_sha256([EMBEDDED_CORPUS])}
    folder = pathlib.Path(corpus)
    meta_path = folder / PREPARED_META
    name = f"{folder.parent.name}/{folder.name}"  # e.g. debian8k/tokens: the build's folder names it
    if not meta_path.is_file():
        return {"name": name, "files_sha256": _files_sha256(corpus_files(corpus, setting="--corpus"))}
    meta = json.loads(meta_path.read_text())
    digest = hashlib.sha256()
    with open(folder / "tokens.bin", "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    keep = ("vocab_size", "eod_id", "num_documents", "num_tokens", "max_token_id")
    return {"name": name, **{k: meta[k] for k in keep if k in meta}, "tokens_sha256": digest.hexdigest()}


def _files_sha256(files: list[pathlib.Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


_HASHES = ("tokens_sha256", "files_sha256")


def same_corpus(theirs: dict, ours: dict) -> bool:
    """Whether two corpus identities name the same data: by the hashes both have, else by name
    (a record from before text corpora were hashed)."""
    both = [key for key in _HASHES if key in theirs and key in ours]
    if both:
        return all(theirs[key] == ours[key] for key in both)
    if any(key in theirs for key in _HASHES) and any(key in ours for key in _HASHES):
        return False  # one a prepared corpus, the other not
    return theirs.get("name") == ours.get("name")


def describe_corpus(identity: dict) -> str:
    """`name` (sha256 0123456789ab...) for the messages."""
    digest = next((identity[key] for key in _HASHES if key in identity), None)
    return f"{identity.get('name')!r}" + (f" (sha256 {digest[:12]}...)" if digest else "")


def training_tokens(corpus: str, eval_fraction: float, seed: int) -> int | None:
    """Tokens in the training split of a prepared corpus (the split train.py makes for `seed`),
    with the end-of-document tokens; None for other corpora."""
    folder = pathlib.Path(corpus) if corpus else None
    if folder is None or not (folder / "offsets.npy").is_file():
        return None
    lengths = np.diff(np.load(folder / "offsets.npy"))
    train, _ = split_documents(len(lengths), eval_fraction, seed)
    return int(lengths[train].sum())


def document_sources(corpus: str) -> list[str] | None:
    """The "source" of every document of a prepared corpus, in order, from the documents.jsonl
    its meta.json names (as scripts/build_debian_corpus.py writes it); None when there is none."""
    folder = pathlib.Path(corpus) if corpus else None
    if folder is None or not (folder / "meta.json").is_file():
        return None
    source = pathlib.Path(str(json.loads((folder / "meta.json").read_text()).get("source", "")))
    if source.suffix != ".jsonl" or not source.is_file():
        return None
    with open(source, encoding="utf-8") as f:
        names = [str(json.loads(line).get("source", "")) for line in f if line.strip()]
    return names if any(names) else None


def held_out_coverage(corpus: str, config: dict, seed: int, sources: list[str] | None) -> dict | None:
    """What the evaluations of a run read from a prepared corpus: the number of held-out
    documents their sequences touch, and per source when `sources` names each document's."""
    folder = pathlib.Path(corpus) if corpus else None
    if folder is None or not (folder / "offsets.npy").is_file():
        return None
    data, train = config["data"], config["train"]
    offsets = np.load(folder / "offsets.npy")
    ids = held_out_documents(offsets, data["eval_fraction"], seed, data["seq_len"],
                             train["eval_batches"] * data["batch_size"])
    coverage = {"documents": len(ids)}
    if sources is not None and len(sources) == len(offsets) - 1:
        counts: dict[str, int] = {}
        for i in ids:
            counts[sources[i]] = counts.get(sources[i], 0) + 1
        coverage["documents_by_source"] = dict(sorted(counts.items()))
    return coverage


def _series(records: list[dict], names: tuple[str, ...]) -> dict[str, list]:
    out = {"step": [r["step"] for r in records]}
    for name in names:
        out[name] = [_round(r.get(name)) for r in records]
    return out


def _round(value):
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, list):
        return [_round(v) for v in value]
    return value


def _routing(workdir: pathlib.Path, model: dict) -> dict:
    evals = read_records(workdir / ROUTING_FILE)
    if not evals:
        return {}
    layers = [metrics_lib.layer_routing(np.asarray(e["expert_load"]), np.asarray(e["pool_sizes"]), model["num_experts"],
                                    model["reuse"]) for e in evals]
    return {"step": [e["step"] for e in evals],
            **{f"{name}_by_layer": [_round(entry[name].tolist()) for entry in layers]
               for name in ("lbv_max", "underused_share", "foreign_share")},
            "final_expert_load": _round(evals[-1]["expert_load"]), "pool_sizes": evals[-1]["pool_sizes"]}


def _timing(attempts: list[dict], train: list[dict], tokens_per_step: int) -> dict:
    # The first logged interval of every attempt includes compilation: the median ignores it.
    rates = [r["tokens_per_sec"] for r in train if r.get("tokens_per_sec")]
    median = float(np.median(rates)) if rates else None
    return {"wall_seconds": round(sum(a["seconds"] for a in attempts), 1), "attempts": len(attempts),
            "tokens_per_sec": _round(median),
            "seconds_per_step": _round(tokens_per_step / median) if median else None}


def build_record(*, study: str, arm: str, seed: int, workdir: pathlib.Path, overrides: list[str],
                 sizes: dict, corpus: dict, train_tokens: int | None, held_out: dict | None = None) -> dict:
    """The record of the finished run in `workdir` (train.py's config.json, metrics.jsonl,
    routing.jsonl, and the runner's attempts file); `sizes` is train.py --dry-run's JSON."""
    config = json.loads((workdir / "config.json").read_text())
    if config["data"]["corpus"]:
        config["data"]["corpus"] = CORPUS_PLACEHOLDER
    metrics = read_records(workdir / METRICS_FILE)
    train = [r for r in metrics if "loss" in r]
    evals = [r for r in metrics if "eval_loss" in r]
    attempts = read_records(workdir / ATTEMPTS_FILE)
    steps, per_step = config["train"]["steps"], sizes["tokens_per_step"]
    eval_seqs = config["train"]["eval_batches"] * config["data"]["batch_size"]
    return {
        "version": RECORD_VERSION, "study": study, "arm": arm, "seed": seed, "overrides": overrides,
        "config": config, "corpus": corpus, "sizes": sizes,
        "tokens": {"per_step": per_step, "trained": steps * per_step, "corpus_train": train_tokens,
                   "epochs": _round(steps * per_step / train_tokens) if train_tokens else None,
                   "per_eval": eval_seqs * config["data"]["seq_len"]},
        "held_out": held_out,
        "time": _timing(attempts, train, per_step),
        "commits": sorted({a["commit"] for a in attempts}), "dirty": any(a.get("dirty") for a in attempts),
        "cpu": attempts[-1].get("cpu", "") if attempts else "",
        "cores_per_run": len(attempts[-1].get("cores", [])) if attempts else 0,
        "train": _series(train, _TRAIN_SERIES),
        "eval": _series(evals, _EVAL_SERIES),
        "final": {k: _round(evals[-1][k]) for k in ("step", *_EVAL_SERIES, "eval_ppl") if k in evals[-1]},
        "routing": _routing(workdir, config["model"]),
    }

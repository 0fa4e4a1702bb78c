"""docs/reproduction.md from the records of one or more studies (a section each): intervals,
paired differences, gaps to the baseline over training, verdicts and decision rules.

Every number is a mean over seeds with a 95% Student-t interval, and every comparison is
paired: arm minus the other arm on the same seed, which shares its data order, held-out set and
initial routers' random stream, so seed-to-seed noise cancels. A verdict says "lower" or
"higher" only when the paired interval excludes zero; with fewer than two paired seeds it says
that there are not enough runs yet. Missing runs are listed, never silently dropped.
"""

from __future__ import annotations

import collections
import itertools
import math
import os
import pathlib
import shlex

import numpy as np

from rexmoe_jax import outputs
from rexmoe_jax.study import figures as study_figures
from rexmoe_jax.study.record import load_record
from rexmoe_jax.study.spec import Study, StudyError
from rexmoe_jax.study.stats import lowest_upper_end, mean_interval, paired_difference, paired_values

_MARK = "Written by `python -m rexmoe_jax.study report"  # How a report this wrote is recognised.
# metric -> (what it is, unit, what "lower" means, what "higher" means)
_METRICS = {
    "final_eval_loss": ("final held-out loss", "nats", "better", "worse"),
    "final_underused_share": ("final share of under-used experts", "", "more balanced", "less balanced"),
    "final_lbv_max": ("final largest LBV", "", "more balanced", "less balanced"),
    "final_foreign_share": ("final share of cross-layer assignments", "", "less cross-layer routing",
                            "more cross-layer routing"),
}


def metric_value(record: dict, metric: str) -> float | None:
    if metric.startswith("train_loss@"):
        first, last = map(int, metric.split("@")[1].split("-"))
        losses = [loss for step, loss in zip(record["train"]["step"], record["train"]["loss"]) if first <= step <= last]
        return float(np.mean(losses)) if losses else None
    if metric.startswith("eval_loss@"):
        step = int(metric.split("@")[1])
        steps = record["eval"]["step"]
        return record["eval"]["eval_loss"][steps.index(step)] if step in steps else None
    return record["final"].get(metric.removeprefix("final_"))


# --------------------------------------------------------------------------------------------
# Loading


def load_records(study: Study, results: pathlib.Path) -> dict[str, dict[int, dict]]:
    """arm -> seed -> record, for the planned runs that have one."""
    found: dict[str, dict[int, dict]] = {arm.name: {} for arm in study.arms}
    for arm, seed in study.queue():
        record = load_record(results / arm.name / f"seed{seed}.json", study.overrides(arm, seed))
        if record is not None:
            found[arm.name][seed] = record
    return found


def _values(records: dict[int, dict], metric: str) -> dict[int, float]:
    return {seed: metric_value(r, metric) for seed, r in records.items()}


# --------------------------------------------------------------------------------------------
# Markdown


def _tokens(n: float | None) -> str:
    if n is None:
        return "unknown"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def _duration(seconds: float) -> str:
    """42 s, 17 min or 2.5 h."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def _status(study: Study, found: dict[str, dict[int, dict]]) -> list[str]:
    planned = len(study.queue())
    done = sum(len(v) for v in found.values())
    lines = ["## Status", "", f"{done} of {planned} planned runs are recorded."]
    missing = [f"`{a.name}` seed{'s' if len(a.seeds) - len(found[a.name]) > 1 else ''} "
               + ", ".join(str(s) for s in a.seeds if s not in found[a.name])
               for a in study.arms if len(found[a.name]) < len(a.seeds)]
    if missing:
        lines.append("Missing: " + "; ".join(missing) + ". Everything below uses only the recorded runs.")
    absent = [a.name for a in study.arms if not found[a.name]]
    if absent:
        lines.append(f"Arms with no run yet: {', '.join(f'`{n}`' for n in absent)}.")
    return lines + [""]


def _machines(records) -> str:
    """The CPUs the runs were timed on, with their run counts where there are several (time and
    tokens/s are comparable only within one)."""
    counts = collections.Counter(r["cpu"] or "an unnamed CPU" for r in records)
    if len(counts) == 1:
        return next(iter(counts))
    return " and ".join(f"{cpu} ({n} runs)" for cpu, n in counts.most_common())


def _corpus_line(corpus: dict, train_tokens: int | None, epochs: float) -> str:
    if "num_documents" not in corpus:
        return f"- Corpus `{corpus.get('name')}` (not a prepared folder: its token count is not recorded)."
    return (f"- Corpus `{corpus['name']}`: {corpus['num_documents']:,} documents, {_tokens(corpus['num_tokens'])} "
            f"tokens ({corpus['vocab_size']:,}-token tokenizer); training split {_tokens(train_tokens)} tokens, so "
            f"a run reads {epochs:.3f} of an epoch"
            + (": text repeats within a run." if epochs > 1 else ": no text repeats within a run."))


def _run_seconds(record: dict, steps: int) -> float:
    return steps * (record["time"]["seconds_per_step"] or 0.0)


def _setup(study: Study, found: dict[str, dict[int, dict]]) -> list[str]:
    records = [r for runs in found.values() for r in runs.values()]
    if not records:
        return ["## Setup", "", "No run is recorded yet.", ""]
    first = records[0]
    config, tokens, corpus = first["config"], first["tokens"], first["corpus"]
    # A record written without the runner (no attempts file) has no hardware. Run time is steps x
    # the run's median step time: the runner logs an attempt's wall time when its train.py ends,
    # so an attempt cut short with the runner (a machine restart) is missing from wall_seconds.
    timed = [r for r in records if r["time"]["attempts"]] or records
    walls = [_run_seconds(r, study.steps) for r in timed]
    epochs = max((r["tokens"]["epochs"] or 0) for r in records)
    lines = ["## Setup", "",
             f"- Preset `{study.preset.relative_to(study.preset.parent.parent)}` with, for every arm:",
             "", "  ```", *(f"  {o}" for o in study.base), "  ```", "",
             (f"- {study.steps:,} steps of {config['data']['batch_size']} x {config['data']['seq_len']} = "
              f"{tokens['per_step']:,} tokens: {_tokens(tokens['trained'])} tokens per run; PSR t_s = "
              f"{config['psr']['start_step']:,}, t_e = {config['psr']['end_step']:,} (where an arm turns PSR on)."),
             _corpus_line(corpus, tokens["corpus_train"], epochs),
             f"- Held-out evaluation: {_tokens(tokens['per_eval'])} tokens every {config['train']['eval_every']} steps.",
             (f"- Run time (steps x the run's median step time; start-up, compiling and evaluations not "
              f"counted): {_duration(sum(walls))} in all over {len(timed)} timed runs "
              f"({_duration(min(walls))} to {_duration(max(walls))} each) on {_machines(timed)}, "
              f"{timed[0]['cores_per_run']} core(s) per run"
              + (f"; {len(records) - len(timed)} run(s) recorded without timing." if len(timed) < len(records)
                 else ".")),
             f"- Code: commit(s) {', '.join(sorted({c[:10] for r in records for c in r['commits']}))}"
             + (" (some with uncommitted changes)." if any(r["dirty"] for r in records) else "."), "",
             "| arm | what | overrides | parameters (total / active / router) | seeds done "
             "| run time per run | tokens/s |",
             "|---|---|---|---|---|---|---|"]
    for arm in study.arms:
        runs = list(found[arm.name].values())
        sizes = runs[0]["sizes"] if runs else None
        size = (f"{sizes['params_total'] / 1e6:.2f}M / {sizes['params_active'] / 1e6:.2f}M / "
                f"{sizes['params_router'] / 1e3:.1f}k") if sizes else "-"
        walls = [_run_seconds(r, study.steps) for r in runs if r["time"]["attempts"]]
        minutes = _duration(float(np.mean(walls))) if walls else "-"
        rate = f"{np.mean([r['time']['tokens_per_sec'] or 0 for r in runs]):,.0f}" if runs else "-"
        lines.append(f"| `{arm.name}` | {arm.about} | {' '.join(f'`{o}`' for o in arm.overrides) or '-'} | {size} "
                     f"| {len(runs)} of {len(arm.seeds)} | {minutes} | {rate} |")
    return lines + [""]


def _results(study: Study, found: dict[str, dict[int, dict]]) -> list[str]:
    baseline = _values(found[study.baseline], "final_eval_loss")
    lines = ["## Held-out loss at the end", "",
             (f"Means over seeds with 95% Student-t intervals; the last column is the paired difference "
              f"to `{study.baseline}` on the same seeds (negative: lower loss than the baseline)."), "",
             "| arm | final held-out loss | perplexity | minus baseline, paired |", "|---|---|---|---|"]
    for arm in study.arms:
        values = _values(found[arm.name], "final_eval_loss")
        loss = mean_interval(values.values())
        if loss is None:
            lines.append(f"| `{arm.name}` | no run yet | | |")
            continue
        diff = paired_difference(values, baseline) if arm.name != study.baseline else None
        lines.append(f"| `{arm.name}` | {loss.text()} | {math.exp(loss.mean):.2f} | "
                     f"{diff.text(signed=True) if diff else '-'} |")
    return lines + [""]


def _gap_points(record: dict) -> list[tuple[str, int]]:
    """(label, step) of t_s, t_e and the end. An arm without PSR is read at the same steps as
    the arms that widen their pools there (the gate's gap at t_s and t_e is part of its story)."""
    psr, steps = record["config"]["psr"], record["config"]["train"]["steps"]
    points = [("t_s", psr["start_step"]), ("t_e", psr["end_step"])]
    return [(label, step) for label, step in points if 0 < step < steps] + [("end", steps)]


def _last_evaluation(runs: list[dict], step: int) -> int | None:
    """The last step at or before `step` that every run of `runs` evaluated."""
    common = set.intersection(*(set(r["eval"]["step"]) for r in runs))
    return max((s for s in common if s <= step), default=None)


def _gaps(study: Study, found: dict[str, dict[int, dict]]) -> list[str]:
    """Paired differences to the baseline at t_s, t_e and the end: the training loss averaged
    over the logged steps in a window before each point (200 steps, a tenth of a shorter study,
    never less than the logging interval), and the held-out loss at the last evaluation at or
    before it (the step in the header; a cell names its own where an arm evaluates elsewhere)."""
    base = found[study.baseline]
    arms = [a for a in study.arms if a.name != study.baseline and found[a.name]]
    if not base or not arms:
        return []
    points = max((_gap_points(r) for arm in arms for r in found[arm.name].values()), key=len)
    log_every = max(r["config"]["train"].get("log_every", 1) for runs in found.values()
                    for r in runs.values())
    window = max(min(200, study.steps // 10), log_every, 1)
    at = {step: _last_evaluation(list(base.values()), step) for _, step in points}
    held_out = [f"held-out at {label}" + (f" ({at[step]:,})" if at[step] is not None else "")
                for label, step in points]
    header = " | ".join([f"training at {label} ({step:,})" for label, step in points] + held_out)
    lines = ["## Gap to the baseline over training", "",
             (f"Each arm minus `{study.baseline}` on the same seeds, mean with 95% interval: the training "
              f"loss averaged over the logged steps within the {window} steps up to each point (single "
              "logged steps are noisy), and the held-out loss at the last evaluation at or before it (the "
              "step in brackets). Positive: the arm trails the baseline."), "",
             f"| arm | {header} |", "|---|" + "---|" * (2 * len(points))]
    base_values = {}
    for arm in arms:
        runs = list(found[arm.name].values())
        cells = []
        for kind in ("train", "eval"):
            for _, step in points:
                evaluated = _last_evaluation(runs + list(base.values()), step) if kind == "eval" else None
                if kind == "eval" and evaluated is None:
                    cells.append("-")
                    continue
                metric = (f"train_loss@{max(step - window + 1, 0)}-{step}" if kind == "train"
                          else f"eval_loss@{evaluated}")
                if metric not in base_values:
                    base_values[metric] = _values(base, metric)
                mine = {k: v for k, v in _values(found[arm.name], metric).items() if v is not None}
                diff = paired_difference(mine, {k: v for k, v in base_values[metric].items() if v is not None})
                cell = diff.text(signed=True) if diff else "-"
                moved = kind == "eval" and diff is not None and evaluated != at[step]
                cells.append(cell + (f" (at {evaluated:,})" if moved else ""))
        lines.append(f"| `{arm.name}` | {' | '.join(cells)} |")
    return lines + [""]


def _coverage(found: dict[str, dict[int, dict]]) -> list[str]:
    """What the held-out evaluations read, per seed (the same for every arm of a seed)."""
    by_seed = {}
    for runs in found.values():
        for seed, record in runs.items():
            if record.get("held_out"):
                by_seed.setdefault(seed, (record["held_out"], record["tokens"]["per_eval"]))
    if not by_seed:
        return []
    lines = ["## The held-out set", "",
             ("Sequences drawn by the seed from all held-out documents (never seen in training), the same for "
              "every arm of a seed. Documents they touch, in all and per source:"), "",
             "| seed | tokens | documents | per source |", "|---|---|---|---|"]
    for seed, (coverage, tokens) in sorted(by_seed.items()):
        sources = ", ".join(f"{name} {n}" for name, n in coverage.get("documents_by_source", {}).items()) or "-"
        lines.append(f"| {seed} | {tokens:,} | {coverage['documents']} | {sources} |")
    return lines + [""]


def _limits(study: Study) -> list[str]:
    return ["## What this scale cannot say", "", study.limits, ""] if study.limits else []


def _describe(metric: str) -> tuple[str, str, str, str]:
    """(what it is, unit, what "lower" means, what "higher" means) of a question's metric."""
    if metric in _METRICS:
        return _METRICS[metric]
    kind, where = metric.split("@")
    if kind == "train_loss":
        return f"mean training loss over steps {where}", "nats", "better", "worse"
    return f"held-out loss at step {where}", "nats", "better", "worse"


def _rule(question, differences: list[float], planned: int) -> str:
    """The outcome of the decision rules written before the runs, from the paired differences;
    with fewer than planned, where it stands so far (a rule decides on all its seeds), unless no
    value of the missing seeds can change the outcome."""
    diff = mean_interval(differences)

    def outcome(passed: bool, settled_by: str = "") -> str:
        if diff.n < planned and not settled_by:
            return (f"**{'passes' if passed else 'fails'} so far**, undecided until all {planned} "
                    "planned seeds are in")
        return f"**{'passes' if passed else 'fails'}**{settled_by}"

    text = ""
    if question.decide_below is not None:
        text += (f" Decision rule (written before the runs): the difference must be below "
                 f"{question.decide_below:g}; it is {diff.mean:+.3f}: "
                 f"{outcome(diff.mean < question.decide_below)}.")
    if question.interval_below is not None:
        settled_by = ""
        if diff.n < planned:  # The upper end grows without bound with the missing values, so it
            # can always fail; it is settled when even its lowest reach is not below the bound.
            lowest = lowest_upper_end(differences, planned - diff.n)
            if lowest is not None and lowest >= question.interval_below:
                others = "other seed gives" if planned - diff.n == 1 else f"other {planned - diff.n} give"
                settled_by = (f" with {diff.n} of {planned} planned seeds: whatever the {others}, the "
                              f"upper end cannot come below {lowest:+.3f}")
        text += (f" Decision rule (written before the runs): the whole interval must lie below "
                 f"{question.interval_below:g}; its upper end is {diff.high:+.3f}: "
                 f"{outcome(diff.high < question.interval_below, settled_by)}.")
    return text


def verdict(study: Study, found: dict[str, dict[int, dict]], question) -> str:
    what, unit, lower, higher = _describe(question.metric)
    differences = paired_values(_values(found[question.arm], question.metric),
                                _values(found[question.against], question.metric))
    diff = mean_interval(differences)
    planned = min(len(study.arm(question.arm).seeds), len(study.arm(question.against).seeds))
    if diff is None or diff.n < 2:
        return (f"Not enough runs yet: {diff.n if diff else 0} paired seed(s) of {planned} planned; "
                "an interval needs at least two.")
    unit = f" {unit}" if unit else ""
    numbers = (f"`{question.arm}` minus `{question.against}` in {what}: {diff.mean:+.3f}{unit} "
               f"(95% CI {diff.low:+.3f} to {diff.high:+.3f}, {diff.n} paired seeds"
               + (f" of {planned} planned)" if diff.n < planned else ")"))
    if diff.high < 0:
        return f"**Lower ({lower})**: {numbers}.{_rule(question, differences, planned)}"
    if diff.low > 0:
        return f"**Higher ({higher})**: {numbers}.{_rule(question, differences, planned)}"
    return (f"**No difference resolved** at this budget: {numbers}; the interval includes zero."
            f"{_rule(question, differences, planned)}")


def _questions(study: Study, found) -> list[str]:
    lines = ["## Questions", ""]
    for i, question in enumerate(study.questions, 1):
        lines += [f"{i}. **{question.text}** {verdict(study, found, question)}", ""]
    return lines


def _routing(study: Study, found) -> list[str]:
    if not any(found.values()):
        return []
    lines = ["## Routing at the end", "",
             ("On the held-out text over the full pool (no PSR mask): the largest LBV = (load - mean) / mean, "
              "the share of experts with less than half the uniform load, and the share of assignments that "
              "go to experts owned by another layer of the group (0 at r = 1). Means with 95% intervals."), "",
             "| arm | largest LBV | under-used share | cross-layer share | cross-layer share by layer (mean) |",
             "|---|---|---|---|---|"]
    for arm in study.arms:
        runs = found[arm.name]
        if not runs:
            continue
        cells = [mean_interval(_values(runs, m).values()).text(2) for m in
                 ("final_lbv_max", "final_underused_share", "final_foreign_share")]
        by_layer = np.mean([r["routing"]["foreign_share_by_layer"][-1] for r in runs.values()], axis=0)
        lines.append(f"| `{arm.name}` | {' | '.join(cells)} | {' '.join(f'{v:.2f}' for v in by_layer)} |")
    return lines + [""]


def _closing(study: Study, found) -> list[str]:
    if not study.questions:
        return []
    question = study.questions[0]
    records = [r for r in found[question.arm].values()]
    tokens = _tokens(records[0]["tokens"]["trained"]) if records else "?"
    differences = paired_values(_values(found[question.arm], question.metric),
                                _values(found[question.against], question.metric))
    diff = mean_interval(differences)
    if diff is None or diff.n < 2:
        line = f"`{question.arm}` vs `{question.against}`: not enough runs yet."
    else:
        line = (f"`{question.arm}` vs `{question.against}`: {diff.mean:+.3f} nats (95% CI {diff.low:+.3f} to "
                f"{diff.high:+.3f}), {diff.n} seeds, {tokens} tokens per run.")
    return ["## Closing note", "", line, verdict(study, found, question), ""]


def _study_lines(study: Study, results: pathlib.Path, output: pathlib.Path, figures: pathlib.Path) -> list[str]:
    """One study's report, headings from level 1, with its figures drawn into `figures`."""
    found = load_records(study, results)
    figures.mkdir(parents=True, exist_ok=True)
    pictures = study_figures.draw_all(study, found, figures) if any(found.values()) else []
    root = output.parent.parent.resolve()
    source = os.path.relpath(study.path.resolve(), root)
    lines = [f"# Reproduction study: {study.title}", "",
             (f"From `{source}` and the records in `{os.path.relpath(results.resolve(), root)}`."), "",
             *_status(study, found), *_setup(study, found), *_coverage(found), *_results(study, found),
             *_gaps(study, found), *_questions(study, found), *_routing(study, found)]
    folder = os.path.relpath(figures, output.parent)
    lines += ["## Figures", ""] if pictures else []
    for name, caption in pictures:
        lines += [f"![{caption}]({folder}/{name})", "", f"*{caption}*", ""]
    return lines + _limits(study) + _closing(study, found)


def _root(output: pathlib.Path) -> pathlib.Path:
    """The folder a report's regenerate command runs from: the one above the report's folder
    (the repository for docs/reproduction.md)."""
    return output.resolve().parent.parent


def _reported_studies(path: pathlib.Path) -> set[str] | None:
    """The study files named in the regenerate command of a report this wrote (resolved), or
    None when the file is not such a report."""
    text = path.read_text(errors="replace")
    start = text.find(_MARK)
    if start < 0:
        return None
    try:
        words = shlex.split(text[start + len(_MARK):].split("`", 1)[0])
    except ValueError:  # a header edited by hand: judge it by its mark alone
        words = []
    names = itertools.takewhile(lambda word: not word.startswith("--"), words)
    return {str((_root(path) / name).resolve()) for name in names}


def write_report(studies: list[tuple[Study, pathlib.Path]], output: pathlib.Path, *,
                 results_given: bool = False) -> int:
    """Writes the report of (study, records folder) pairs and their figures; several studies
    become one section each. Returns 0 (partial results are reported as such). An existing
    report is replaced only by one of at least the studies it reports: a study of one's own
    cannot replace this project's report (the default --output), nor a shorter list drop a
    section. `results_given`: the regenerate command names the one study's records folder."""
    figures = output.with_suffix("")
    outputs.check_file(output, "--output", ours=lambda path: _reported_studies(path) is not None)
    reported = _reported_studies(output) if output.is_file() else None
    missing = sorted((reported or set()) - {str(study.path.resolve()) for study, _ in studies})
    if missing:
        names = ", ".join(os.path.relpath(name, _root(output)) for name in sorted(reported))
        raise StudyError(f"{str(output)!r} is the report of {names}; a report there must name each of them "
                         f"(this one leaves out {os.path.relpath(missing[0], _root(output))}), or give "
                         "--output another file")
    if figures.exists() and not figures.is_dir():
        raise StudyError(f"{str(figures)!r}, the folder for the report's figures, is a file; move it away")
    if figures.is_dir():  # Before anything is drawn: the report replaces only pictures it drew.
        foreign = sorted(p for p in figures.rglob("*.png") if not outputs.drawn_by_matplotlib(p))
        if foreign:
            raise StudyError(f"{str(foreign[0])!r}, in the report's figures folder, was not drawn by it; "
                             "move it away first")
    root = _root(output)
    words = [os.path.relpath(study.path.resolve(), root) for study, _ in studies]
    if results_given:
        words += ["--results", os.path.relpath(studies[0][1].resolve(), root)]
    if output.name != "reproduction.md" or output.parent.name != "docs":
        words += ["--output", os.path.relpath(output.resolve(), root)]
    regenerate = f"{_MARK} {shlex.join(words)}`; regenerate it rather than edit it."
    if len(studies) == 1:
        study, results = studies[0]
        lines = _study_lines(study, results, output, figures)
        lines[2:2] = [regenerate, ""]
    else:
        lines = [f"# Reproduction studies: {', '.join(study.title for study, _ in studies)}", "", regenerate, ""]
        for study, results in studies:
            # One level down: the studies are sections of this document.
            lines += [("#" + line) if line.startswith("#") else line
                      for line in _study_lines(study, results, output, figures / study.name)]
    outputs.write_text(output, "\n".join(lines).rstrip() + "\n")
    print(f"wrote {output} and its figures in {figures}")
    return 0

"""A study file: arms x seeds of one preset, a budget and the questions the report answers.

A study file (TOML) names a preset, overrides shared by every arm ([base]), the budget
([budget]: the train.* cadences), the seeds, the arms (each a name and its own overrides,
optionally fewer seeds) and the questions the report answers. `load_study` reads and checks one
(every arm's config is built, so a bad override fails before anything runs).
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import tomllib

from rexmoe_jax.cli import BadInput
from rexmoe_jax.config import ConfigError, apply_overrides, load_preset, parse_overrides

ROOT = pathlib.Path(__file__).resolve().parents[2]  # the repository: rexmoe_jax/study/spec.py
TRAIN_SCRIPT = ROOT / "train.py"

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# Study-file keys mapped to train.* fields; budget.steps is required, the rest optional.
_BUDGET_KEYS = ("steps", "eval_every", "eval_batches", "log_every", "checkpoint_every", "keep_checkpoints")
# Metrics a question may compare, read from a run record (record.py).
METRICS = ("final_eval_loss", "final_underused_share", "final_lbv_max", "final_foreign_share")


class StudyError(BadInput):
    """A bad study file, or results that do not belong to it; the message names the problem."""


@dataclasses.dataclass(frozen=True)
class Arm:
    name: str
    overrides: tuple[str, ...]
    seeds: tuple[int, ...]
    group: str  # Arms of a group share a figure in the report ("core", "reviewers", ...).
    about: str


@dataclasses.dataclass(frozen=True)
class Question:
    """"Is `arm` different from `against` in `metric`?", answered by paired seeds."""

    text: str
    arm: str
    against: str
    # One of METRICS, "eval_loss@STEP" (the held-out loss at an eval step) or "train_loss@A-B"
    # (the mean training loss over the logged steps A to B).
    metric: str
    # A decision rule written before the runs: the arm passes when its paired mean difference
    # to `against` is below this (decide_below), or the whole 95% interval is (interval_below);
    # None when the question has no such rule.
    decide_below: float | None = None
    interval_below: float | None = None


@dataclasses.dataclass(frozen=True)
class Study:
    name: str
    title: str
    path: pathlib.Path
    preset: pathlib.Path
    corpus: str  # How to build the corpus; non-empty means `run` needs --corpus.
    baseline: str
    base: tuple[str, ...]  # [budget] as train.* overrides, then [base].
    steps: int
    arms: tuple[Arm, ...]
    questions: tuple[Question, ...]
    heatmaps: tuple[str, ...]  # Arms whose final expert loads the report draws.
    limits: str = ""  # What this study's scale cannot say, for the report.

    def arm(self, name: str) -> Arm:
        return next(a for a in self.arms if a.name == name)

    def overrides(self, arm: Arm, seed: int) -> list[str]:
        """The run's overrides as recorded: everything but the machine's corpus path."""
        return [*self.base, *arm.overrides, f"train.seed={seed}"]

    def queue(self) -> list[tuple[Arm, int]]:
        """Every (arm, seed), seed-major: all first seeds, then all second seeds, ..., so
        partial results cover every arm."""
        depth = max(len(a.seeds) for a in self.arms)
        return [(a, a.seeds[i]) for i in range(depth) for a in self.arms if i < len(a.seeds)]


# --------------------------------------------------------------------------------------------
# Reading a study file. Every problem is a StudyError naming the key, the arm or the question.


def _flatten(table: dict, prefix: str = "") -> dict[str, object]:
    """{"model": {"reuse": 4}} and {"model.reuse": 4} both -> {"model.reuse": 4}: TOML's dotted
    keys nest, quoted ones do not, and a study file may use either."""
    flat = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _override_list(table: object, where: str) -> tuple[str, ...]:
    if not isinstance(table, dict):
        raise StudyError(f"{where} must be a table of config keys, e.g. {{\"model.reuse\" = 4}}")
    items = []
    for key, value in _flatten(table).items():
        if isinstance(value, bool):  # Before int: bool is an int in Python.
            text = "true" if value else "false"
        elif isinstance(value, (int, float, str)):
            text = str(value)
        else:
            raise StudyError(f"{where}: {key} must be a number, string or boolean, got {type(value).__name__}")
        items.append(f"{key}={text}")
    return tuple(items)


def _check_keys(table: dict, allowed: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise StudyError(f"{where}: unknown key {unknown[0]!r}; allowed: {', '.join(allowed)}")


def _required(table: dict, key: str, kind: type, where: str):
    if key not in table:
        raise StudyError(f"{where}: {key!r} is missing")
    value = table[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise StudyError(f"{where}: {key!r} must be a {kind.__name__}, got {value!r}")
    return value


def _budget(table: object) -> tuple[int, tuple[str, ...]]:
    if not isinstance(table, dict):
        raise StudyError("[budget] is missing; it needs at least steps")
    _check_keys(table, _BUDGET_KEYS, "[budget]")
    steps = _required(table, "steps", int, "[budget]")
    if table.get("checkpoint_every", 0) <= 0:
        raise StudyError("[budget] checkpoint_every must be > 0, so that an interrupted run loses little")
    return steps, tuple(f"train.{key}={table[key]}" for key in _BUDGET_KEYS if key in table)


def _arm(table: object, seeds: tuple[int, ...], index: int) -> Arm:
    if not isinstance(table, dict):
        raise StudyError(f"[[arm]] number {index + 1} is not a table")
    name = _required(table, "name", str, f"[[arm]] number {index + 1}")
    where = f"arm {name!r}"
    _check_keys(table, ("name", "about", "group", "seeds", "set"), where)
    if not _NAME.fullmatch(name):
        raise StudyError(f"{where}: a name may hold letters, digits, '.', '_' and '-' (it names a folder)")
    count = table.get("seeds", len(seeds))
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= len(seeds):
        raise StudyError(f"{where}: seeds must be an integer from 1 to {len(seeds)} (the study's seeds)")
    return Arm(name, _override_list(table.get("set", {}), where), seeds[:count],
               str(table.get("group", "core")), str(table.get("about", "")))


def _question(table: object, arms: set[str], index: int) -> Question:
    where = f"[[question]] number {index + 1}"
    if not isinstance(table, dict):
        raise StudyError(f"{where} is not a table")
    _check_keys(table, ("text", "arm", "against", "metric", "decide_below", "interval_below"), where)
    rules = {}
    for key in ("decide_below", "interval_below"):
        rule = table.get(key)
        if rule is not None and (isinstance(rule, bool) or not isinstance(rule, (int, float))):
            raise StudyError(f"{where}: {key} must be a number, got {rule!r}")
        rules[key] = None if rule is None else float(rule)
    question = Question(_required(table, "text", str, where), _required(table, "arm", str, where),
                        _required(table, "against", str, where), str(table.get("metric", "final_eval_loss")),
                        **rules)
    for name in (question.arm, question.against):
        if name not in arms:
            raise StudyError(f"{where}: no arm named {name!r}")
    window = re.fullmatch(r"train_loss@(\d+)-(\d+)", question.metric)
    if question.metric not in METRICS and not re.fullmatch(r"eval_loss@\d+", question.metric) and not (
            window and int(window[1]) <= int(window[2])):
        raise StudyError(f"{where}: metric {question.metric!r} is not one of {', '.join(METRICS)}, "
                         "eval_loss@STEP or train_loss@FIRST-LAST")
    return question


def _check_configs(study: Study) -> None:
    """Builds every arm's config now, so a bad override stops the study before any training; and
    checks that each question reads steps its arms log or evaluate."""
    try:
        preset = load_preset(study.preset)
    except ConfigError as err:
        raise StudyError(f"preset: {err}") from None
    configs = {}
    for arm in study.arms:
        try:
            configs[arm.name] = apply_overrides(preset, study.overrides(arm, arm.seeds[0]))
        except ConfigError as err:
            # Named after the shared overrides when those alone do not parse (a mistyped key or
            # value); a combination of settings that is invalid names the arm.
            where = f"arm {arm.name!r}"
            try:
                parse_overrides(study.base)
            except ConfigError:
                where = "[budget] or [base]"
            raise StudyError(f"{where}: {err}") from None
        if configs[arm.name].train.steps != study.steps:
            raise StudyError(f"arm {arm.name!r} changes train.steps; the budget is the same for every arm")
    for index, question in enumerate(study.questions):
        for name in (question.arm, question.against):
            problem = _unread_steps(question.metric, configs[name].train)
            if problem:
                raise StudyError(f"[[question]] number {index + 1}: {question.metric} {problem} "
                                 f"in arm {name!r}")


def _unread_steps(metric: str, train) -> str | None:
    """Why the runs of an arm trained with `train` (a TrainConfig) would never give `metric` a
    value, or None when they would."""
    if metric.startswith("eval_loss@"):
        step = int(metric.split("@")[1])
        if not 1 <= step <= train.steps or not train.evaluates_at(step):
            return (f"asks for a step that is never evaluated (every {train.eval_every} steps and the last, "
                    f"{train.steps})")
    elif metric.startswith("train_loss@"):
        first, last = map(int, metric.split("@")[1].split("-"))
        if not any(train.logs_at(step) for step in range(max(first, 1), min(last, train.steps) + 1)):
            return (f"holds no logged step (every {train.log_every} steps and the last, {train.steps})")
    return None


def load_study(path: str | pathlib.Path) -> Study:
    """Reads and validates a study file; raises StudyError naming what is wrong."""
    path = pathlib.Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise StudyError(f"cannot read {str(path)!r} ({err.strerror})") from None
    except UnicodeDecodeError as err:
        raise StudyError(f"{str(path)!r} is not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    except tomllib.TOMLDecodeError as err:
        raise StudyError(f"not valid TOML ({err})") from None
    _check_keys(raw, ("name", "title", "preset", "corpus", "baseline", "seeds", "budget", "base", "arm",
                      "question", "heatmaps", "limits"), "top level")
    name = _required(raw, "name", str, "top level")
    if not _NAME.fullmatch(name):
        raise StudyError("name may hold letters, digits, '.', '_' and '-' (it names folders)")
    seeds = _required(raw, "seeds", list, "top level")
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise StudyError("seeds must be a non-empty list of distinct integers >= 0")
    steps, budget = _budget(raw.get("budget"))
    arms = tuple(_arm(table, tuple(seeds), i) for i, table in enumerate(_required(raw, "arm", list, "top level")))
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise StudyError(f"arm {next(n for n in names if names.count(n) > 1)!r} is defined twice")
    baseline = _required(raw, "baseline", str, "top level")
    heatmaps = raw.get("heatmaps", [])
    if not isinstance(heatmaps, list) or not all(isinstance(h, str) for h in heatmaps):
        raise StudyError(f"heatmaps must be a list of arm names, like [\"r1\"], got {heatmaps!r}")
    for arm_name in (baseline, *heatmaps):
        if arm_name not in names:
            raise StudyError(f"baseline or heatmaps: no arm named {arm_name!r}")
    questions = tuple(_question(t, set(names), i) for i, t in enumerate(raw.get("question", [])))
    study = Study(name, str(raw.get("title", name)), path, ROOT / _required(raw, "preset", str, "top level"),
                  str(raw.get("corpus", "")), baseline, budget + _override_list(raw.get("base", {}), "[base]"),
                  steps, arms, questions, tuple(heatmaps), str(raw.get("limits", "")).strip())
    _check_configs(study)
    return study

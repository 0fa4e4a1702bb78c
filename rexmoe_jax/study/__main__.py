"""Reproduction studies: a TOML study file of arms x seeds, run as a resumable queue, reported.

    python -m rexmoe_jax.study run studies/NAME.toml [--corpus DIR] [--parallel N] [--cores-per-run C]
    python -m rexmoe_jax.study report studies/NAME.toml

The study file's format: spec.py. `run` (runner.py) trains every (arm, seed) as a subprocess
of train.py in RUNS/<study>/<arm>/seed<k>, at most --parallel at once, each pinned to its own
cores with its thread pools sized to them, the first seed of every arm before any second seed. A
run whose record exists is skipped; an interrupted one resumes from its checkpoints (train.py
does that given the same folder). Each finished run leaves a compact JSON record in the results
folder (record.py); `report` (report.py) turns the records into docs/reproduction.md. SIGTERM
or SIGINT stops the children cleanly (they checkpoint and exit) and the sitting exits 130; the
same command resumes.

A study's records go by default to results/<study name> beside its study file (for this
project's studies/NAME.toml: studies/results/NAME), so a study kept outside the repository
keeps its records outside it too.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from rexmoe_jax import cli
from rexmoe_jax.study import report as study_report
from rexmoe_jax.study import runner as study_runner
from rexmoe_jax.study.spec import ROOT, Study, StudyError, load_study


def _parse_args(argv: list[str]) -> argparse.Namespace:
    parser = cli.ArgumentParser(prog="python -m rexmoe_jax.study", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="train the study's runs that have no record yet")
    run.add_argument("study", help="the study file (TOML)")
    run.add_argument("--corpus", default="", help="the prepared corpus folder the study file asks for")
    run.add_argument("--runs", default=str(ROOT / "runs"), help="root of the run folders (default: runs/)")
    run.add_argument("--results", default=None,
                     help="records folder (default: results/<study> beside the study file)")
    run.add_argument("--parallel", type=int, default=1, help="trainings at once (default 1)")
    run.add_argument("--cores-per-run", type=int, default=1, help="cores pinned to each training (default 1)")
    run.add_argument("--cores", default="", help="cores to use, e.g. 1 or 0-3 (default: all this process may use)")
    run.add_argument("--arms", default="", help="only these arms this sitting, e.g. r1,upper-r4 (default: all)")
    run.add_argument("--seeds", default="", help="only these seeds this sitting, e.g. 2 or 2,3 (default: all)")
    run.add_argument("--dry-run", action="store_true", help="print the queue and exit")
    report = commands.add_parser("report", help="write docs/reproduction.md and its figures from the records")
    report.add_argument("study", nargs="+", help="the study file(s) (TOML); several make one section each")
    report.add_argument("--results", default=None,
                        help="records folder (default: results/<study> beside the study file; one study "
                             "only)")
    report.add_argument("--output", default=str(ROOT / "docs" / "reproduction.md"),
                        help="the Markdown file; figures go to a folder of the same stem beside it")
    return parser.parse_args(argv)


def results_folder(study: Study, given: str | None) -> pathlib.Path:
    return pathlib.Path(given) if given else study.path.parent / "results" / study.name


@cli.command
def main(argv: list[str] | None = None) -> int:
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    paths = args.study if args.command == "report" else [args.study]
    studies = []
    for path in paths:
        try:
            studies.append(load_study(path))
        except StudyError as err:
            raise StudyError(f"study file {path}: {err}") from None
    if args.command == "report":
        if args.results and len(studies) > 1:
            raise StudyError("--results names one study's records; leave it out with several study files")
        if args.results and not pathlib.Path(args.results).is_dir():
            raise StudyError(f"--results {args.results!r} is not a folder; give the folder `run` wrote the "
                             "records to")
        return study_report.write_report([(s, results_folder(s, args.results)) for s in studies],
                                         pathlib.Path(args.output), results_given=bool(args.results))
    study = studies[0]
    return study_runner.run(study, study_runner.Options.from_args(args, study, results_folder(study, args.results)))


if __name__ == "__main__":
    raise SystemExit(main())

"""Pictures of a run: python -m rexmoe_jax.plot --workdir DIR [--output FOLDER]

Writes loss.png (training and held-out loss), psr.png (the PSR pool size N_t and the learning
rate) and expert_load.png (per-layer expert loads over the candidate pool at the last
evaluation, as LBV: 0 is perfect balance, -1 an idle expert); after python -m
rexmoe_jax.evaluate, also activation_<set>.png: each layer's expert activation ratios over the
pool on each input set (the paper's Figure 5). A run not trained here yet (an import) but
evaluated gets the activation pictures alone. Needs matplotlib (pip install matplotlib).
"""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np

from rexmoe_jax import cli, outputs
from rexmoe_jax.config import ConfigError
from rexmoe_jax.runlog import METRICS_FILE, ROUTING_FILE, read_records
from rexmoe_jax.runtime.workdir import EVAL_FILE


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only), or a one-line error without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError('plotting needs matplotlib: pip install -e ".[plot]"') from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: pathlib.Path) -> None:
    with outputs.staged_file(path) as staging:  # whole or not at all; a failed write is a WriteError
        fig.savefig(staging, dpi=120, format="png")


def plot_losses(records: list[dict], path: pathlib.Path) -> None:
    plt = pyplot()
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="training loss", lw=1)
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="held-out loss")
    ax.set(xlabel="step", ylabel="cross-entropy (nats)", title="Loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_psr(records: list[dict], path: pathlib.Path) -> None:
    plt = pyplot()
    train = [r for r in records if "psr_pool_size" in r]
    steps = [r["step"] for r in train]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.step(steps, [r["psr_pool_size"] for r in train], where="post", color="C0")
    ax.set(xlabel="step", ylabel="available experts N_t", title="PSR pool size and learning rate")
    ax.grid(alpha=0.3)
    lr_ax = ax.twinx()
    lr_ax.plot(steps, [r["lr"] for r in train], color="C1", lw=1)
    lr_ax.set_ylabel("learning rate", color="C1")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_expert_load(routing: dict, path: pathlib.Path) -> None:
    """A (layers x pool) heatmap of LBV; entries past a smaller last group's pool are blank."""
    plt = pyplot()
    load = np.asarray(routing["expert_load"], np.float64)
    pools = np.asarray(routing["pool_sizes"])[:, None]
    lbv = np.where(np.arange(load.shape[1])[None, :] < pools, load * pools - 1.0, np.nan)
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(min(14, 3 + load.shape[1] / 8), 2 + load.shape[0] / 3))
    # LBV runs from -1 (idle) to pool - 1 (every token): white at 0, blue below, red above.
    norm = TwoSlopeNorm(vmin=-1.0, vcenter=0.0, vmax=max(1.0, float(np.nanmax(lbv))))
    image = ax.imshow(lbv, aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="pool expert (layer j of the group owns j*N ... j*N + N - 1)", ylabel="layer",
           title=f"Expert load over the candidate pool at step {routing['step']} (LBV)")
    fig.colorbar(image, ax=ax, label="LBV = (load - mean) / mean")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_activation(name: str, routing: dict, path: pathlib.Path) -> None:
    """A (layers x pool) heatmap of the share of tokens that activate each expert."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    ratios = np.asarray(routing["activation_ratio"], np.float64)
    fig, ax = plt.subplots(figsize=(min(14, 3 + ratios.shape[1] / 8), 2 + ratios.shape[0] / 3))
    image = ax.imshow(ratios, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="pool expert", ylabel="layer", title=f"Expert activation ratio on {name}")
    fig.colorbar(image, ax=ax, label="share of tokens (a row sums to K)")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def _require(ok: bool, path: pathlib.Path, what: str) -> None:
    if not ok:
        raise ConfigError(f"{path}: {what}; is --workdir a training run?")


def _is_matrix(value) -> bool:
    return (isinstance(value, list) and len(value) > 0 and all(isinstance(row, list) and row for row in value)
            and len({len(row) for row in value}) == 1)


def _inputs(workdir: pathlib.Path) -> tuple[list[dict], dict | None, dict]:
    """(metrics records, last routing record, eval.json's routing), checked before anything is
    drawn: a picture is either drawn whole or the command stops first."""
    metrics_file, routing_file, eval_file = workdir / METRICS_FILE, workdir / ROUTING_FILE, workdir / EVAL_FILE
    records = [r for r in read_records(metrics_file) if isinstance(r.get("step"), int)]
    train = [r for r in records if "loss" in r]
    missing = next((k for r in train for k in ("psr_pool_size", "lr") if k not in r), None)
    _require(missing is None, metrics_file, f"a training record without {missing!r}")
    routing = read_records(routing_file)
    last = routing[-1] if routing else None
    if last is not None:
        for key in ("step", "expert_load", "pool_sizes"):
            _require(key in last, routing_file, f"its last record has no {key!r}")
        _require(_is_matrix(last["expert_load"]), routing_file, "its last 'expert_load' is not a (layers x pool) list")
    sets = {}
    if eval_file.is_file():
        try:
            sets = json.loads(eval_file.read_text())["routing"]
            for name, analysis in sets.items():
                _require(_is_matrix(analysis["activation_ratio"]), eval_file, f"routing {name!r} has no matrix")
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            _require(False, eval_file, "not an evaluate report (no 'routing' with 'activation_ratio')")
    # A run not trained here yet (an import, a widened run) has only what evaluate wrote.
    _require(bool(records) or bool(sets), metrics_file,
             f"has no records with a step, and there is no {EVAL_FILE} with routing to draw")
    return records, last, sets


@cli.command
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m rexmoe_jax.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--output", default=None, help="folder for the PNG files (default: the workdir)")
    args = parser.parse_args(argv)
    workdir = pathlib.Path(args.workdir)
    records, routing, sets = _inputs(workdir)
    output = pathlib.Path(args.output) if args.output else workdir
    if output.exists() and not output.is_dir():
        raise ConfigError(f"--output {str(output)!r} is a file; give a folder")
    activation = {name: "activation_" + "".join(c if c.isalnum() else "_" for c in name) + ".png" for name in sets}
    names = [*["loss.png", "psr.png"] * bool(records), *["expert_load.png"] * (routing is not None),
             *activation.values()]
    for name in names:  # Before drawing anything.
        outputs.check_file(output / name, "--output", ours=outputs.drawn_by_matplotlib)
    pyplot()
    output.mkdir(parents=True, exist_ok=True)
    if records:
        plot_losses(records, output / "loss.png")
        plot_psr(records, output / "psr.png")
    else:
        print(f"note: {workdir / METRICS_FILE} has no training records yet: only evaluate's routing is drawn",
              file=sys.stderr)
    if routing is not None:
        plot_expert_load(routing, output / "expert_load.png")
    for name, analysis in sets.items():
        plot_activation(name, analysis, output / activation[name])
    print(f"wrote {', '.join(names)} to {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

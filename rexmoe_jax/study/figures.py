"""The study report's figures: held-out loss curves with N_t, paired differences to the
baseline over training, final expert loads, and routing over training and by layer.

Bands are 95% Student-t intervals over seeds (none with one seed). Needs matplotlib
(pip install -e ".[plot]").
"""

from __future__ import annotations

import pathlib

import numpy as np

from rexmoe_jax import outputs
from rexmoe_jax.plot import pyplot
from rexmoe_jax.study.spec import Study
from rexmoe_jax.study.stats import mean_interval


def _color(study: Study, arm: str) -> str:
    return f"C{[a.name for a in study.arms].index(arm) % 10}"


def _band(series_by_seed: list[tuple[list[int], list[float]]]):
    """(steps, mean, low, high) over the steps every seed has; low/high equal the mean with one seed."""
    steps = sorted(set.intersection(*(set(s) for s, _ in series_by_seed)))
    rows = np.asarray([[dict(zip(s, v))[t] for t in steps] for s, v in series_by_seed], np.float64)
    intervals = [mean_interval(column) for column in rows.T]
    mean = np.asarray([i.mean for i in intervals])
    low = np.asarray([i.low if i.low is not None else i.mean for i in intervals])
    high = np.asarray([i.high if i.high is not None else i.mean for i in intervals])
    return np.asarray(steps), mean, low, high


def _schedule_lines(ax, record: dict) -> None:
    psr = record["config"]["psr"]
    for step in (psr["start_step"], psr["end_step"]):
        ax.axvline(step, color="0.6", lw=0.8, ls=":")


def _save(fig, path: pathlib.Path, plt) -> None:
    """Writes the figure whole or not at all (report.write_report has checked that no picture
    of a user's is in the folder)."""
    fig.tight_layout()
    try:
        with outputs.staged_file(path) as staging:
            fig.savefig(staging, dpi=110, format="png")
    finally:
        plt.close(fig)


def loss_curves(study: Study, found: dict, group: str, path: pathlib.Path) -> bool:
    """Mean held-out loss per arm of `group` with its band; below, N_t from each arm's log."""
    arms = [a.name for a in study.arms if a.group == group and found[a.name]]
    if not arms:
        return False
    plt = pyplot()
    fig, (ax, pool_ax) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top = []
    for arm in arms:
        runs = list(found[arm].values())
        steps, mean, low, high = _band([(r["eval"]["step"], r["eval"]["eval_loss"]) for r in runs])
        ax.plot(steps, mean, color=_color(study, arm), label=f"{arm} (n = {len(runs)})")
        ax.fill_between(steps, low, high, color=_color(study, arm), alpha=0.2, lw=0)
        top.append(mean[steps >= 0.2 * study.steps].max(initial=mean.min()))
        train = runs[0]["train"]
        pool_ax.step(train["step"], train["psr_pool_size"], where="post", color=_color(study, arm), lw=1)
    # The first evaluations sit far above the rest; zoom on where the arms separate.
    bottom = min(min(r["final"]["eval_loss"] for r in found[a].values()) for a in arms)
    ax.set_ylim(bottom - 0.05, max(top) + 0.05)
    _schedule_lines(ax, next(iter(found[arms[0]].values())))
    ax.set(ylabel="held-out loss (nats)", title=f"Held-out loss, {group} arms (band: 95% CI over seeds)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    pool_ax.set(xlabel="step", ylabel="N_t (available)")
    pool_ax.grid(alpha=0.3)
    _save(fig, path, plt)
    return True


def _smooth(values: list[float], width: int) -> list[float]:
    """Trailing mean over up to `width` points: single logged training steps are noisy."""
    return [float(np.mean(values[max(0, i - width + 1):i + 1])) for i in range(len(values))]


def differences(study: Study, found: dict, path: pathlib.Path, kind: str = "eval") -> bool:
    """Per arm, its loss minus the baseline's on the same seed, over training: the held-out loss
    (kind "eval"), or the training loss (kind "train"), smoothed over 8 logged steps."""
    series, key = ("eval", "eval_loss") if kind == "eval" else ("train", "loss")
    base = found[study.baseline]
    arms = [a.name for a in study.arms if a.name != study.baseline and set(found[a.name]) & set(base)]
    if not arms:
        return False
    plt = pyplot()
    groups = sorted({study.arm(a).group for a in arms}, key=[a.group for a in study.arms].index)
    fig, axes = plt.subplots(len(groups), 1, figsize=(8, 3.2 * len(groups)), sharex=True, squeeze=False)
    for ax, group in zip(axes[:, 0], groups):
        for arm in (a for a in arms if study.arm(a).group == group):
            pairs = []
            for seed in sorted(set(found[arm]) & set(base)):
                mine, theirs = found[arm][seed][series], base[seed][series]
                other = dict(zip(theirs["step"], theirs[key]))
                steps = [s for s in mine["step"] if s in other and s >= 0.1 * study.steps]
                diff = [dict(zip(mine["step"], mine[key]))[s] - other[s] for s in steps]
                pairs.append((steps, _smooth(diff, 8) if kind == "train" else diff))
            steps, mean, low, high = _band(pairs)
            ax.plot(steps, mean, color=_color(study, arm), label=f"{arm} (n = {len(pairs)})")
            ax.fill_between(steps, low, high, color=_color(study, arm), alpha=0.2, lw=0)
        ax.axhline(0.0, color="black", lw=0.8)
        _schedule_lines(ax, next(iter(base.values())))
        what = "held-out" if kind == "eval" else "training"
        ax.set(ylabel="minus baseline (nats)", title=f"{group} arms minus {study.baseline}, {what} loss, paired by seed")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step (dotted: t_s and t_e)")
    _save(fig, path, plt)
    return True


def expert_loads(study: Study, found: dict, path: pathlib.Path) -> bool:
    """Final LBV per layer and pool expert, averaged over seeds, one panel per heatmap arm."""
    arms = [a for a in study.heatmaps if found[a]]
    if not arms:
        return False
    plt = pyplot()
    from matplotlib.colors import TwoSlopeNorm

    fig, axes = plt.subplots(1, len(arms), figsize=(5 * len(arms), 4), squeeze=False)
    for ax, arm in zip(axes[0], arms):
        runs = list(found[arm].values())
        load = np.mean([np.asarray(r["routing"]["final_expert_load"], np.float64) for r in runs], axis=0)
        pools = np.asarray(runs[0]["routing"]["pool_sizes"])[:, None]
        lbv = np.where(np.arange(load.shape[1])[None, :] < pools, load * pools - 1.0, np.nan)
        norm = TwoSlopeNorm(vmin=-1.0, vcenter=0.0, vmax=max(1.0, float(np.nanmax(lbv))))
        image = ax.imshow(lbv, aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest")
        ax.set(xlabel="pool expert (layer j of a group owns j N ... j N + N - 1)", ylabel="layer",
               title=f"{arm}: final LBV (mean of {len(runs)} seed(s))")
        fig.colorbar(image, ax=ax)
    _save(fig, path, plt)
    return True


def routing(study: Study, found: dict, path: pathlib.Path) -> bool:
    """Under-used share and largest LBV over training (held-out, full pool), and the final
    cross-layer share by layer."""
    arms = [a.name for a in study.arms if found[a.name]]
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for arm in arms:
        runs = list(found[arm].values())
        for ax, name in zip(axes[:2], ("underused_share", "lbv_max")):
            steps, mean, _, _ = _band([(r["eval"]["step"], r["eval"][name]) for r in runs])
            ax.plot(steps, mean, color=_color(study, arm), label=arm, lw=1.2)
        by_layer = np.mean([r["routing"]["foreign_share_by_layer"][-1] for r in runs], axis=0)
        axes[2].plot(np.arange(len(by_layer)), by_layer, "o-", color=_color(study, arm), label=arm, ms=3)
    axes[0].set(xlabel="step", ylabel="share", title="Under-used experts (load < half the uniform share)")
    axes[1].set(xlabel="step", ylabel="LBV", title="Largest LBV over layers and experts")
    axes[2].set(xlabel="layer", ylabel="share", title="Final cross-layer share by layer")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=7)
    _save(fig, path, plt)
    return bool(arms)


def draw_all(study: Study, found: dict, folder: pathlib.Path) -> list[tuple[str, str]]:
    """Draws what the records allow; returns (file name, caption) of each figure written."""
    drawn = []
    for group in dict.fromkeys(a.group for a in study.arms):
        name = f"eval_loss_{group.replace(' ', '_')}.png"  # no spaces in file names
        if loss_curves(study, found, group, folder / name):
            drawn.append((name, f"Held-out loss of the {group} arms (mean, 95% band over seeds) and N_t."))
    if differences(study, found, folder / "eval_loss_vs_baseline.png"):
        caption = (f"Held-out loss minus {study.baseline} on the same seed, over training (mean, 95% band); "
                   "dotted lines at t_s and t_e.")
        drawn.append(("eval_loss_vs_baseline.png", caption))
    if differences(study, found, folder / "train_loss_vs_baseline.png", kind="train"):
        caption = (f"Training loss minus {study.baseline} on the same seed (each seed smoothed over 8 logged "
                   "steps; mean, 95% band); dotted lines at t_s and t_e.")
        drawn.append(("train_loss_vs_baseline.png", caption))
    if expert_loads(study, found, folder / "expert_load.png"):
        drawn.append(("expert_load.png", "Final expert loads over each layer's pool as LBV (0: even; -1: idle)."))
    if routing(study, found, folder / "routing.png"):
        caption = ("Routing on held-out text: under-used share and largest LBV over training, and the final "
                   "share of cross-layer assignments by layer (means over seeds).")
        drawn.append(("routing.png", caption))
    return drawn

"""Where a run's metrics go besides metrics.jsonl (runlog.py, always written): TensorBoard event
files and Weights & Biases, chosen by `train.tracker`. Only process 0 opens them.

W&B gets the resolved config, every metrics line (its numbers; per-layer lists as one value per
layer), the held-out evaluations and, at each evaluation, the expert-load heatmap as an image.
The run id is kept in WORKDIR/wandb_run_id, so a resumed training continues the same W&B run;
`WANDB_MODE=offline` writes it under WORKDIR/wandb for a later `wandb sync`.
"""

from __future__ import annotations

import importlib.util
import pathlib
import secrets

import numpy as np

from rexmoe_jax.config import Config, ConfigError, TrainConfig
from rexmoe_jax.runtime.workdir import WriteError, failure_reason

WANDB_RUN_ID = "wandb_run_id"
_PACKAGES = {"tensorboard": ("tensorboardX", "tensorboard"), "wandb": ("wandb", "wandb")}


def chosen(train: TrainConfig) -> tuple[str, ...]:
    """The trackers to open besides jsonl: those named, or by default TensorBoard when
    tensorboardX is installed."""
    if not train.trackers:
        return ("tensorboard",) if importlib.util.find_spec("tensorboardX") else ()
    return tuple(name for name in train.trackers if name != "jsonl")


def check_installed(train: TrainConfig) -> None:
    """Raises ConfigError naming the extra to install for a tracker whose package is missing:
    called before anything slow starts."""
    for name in chosen(train):
        module, extra = _PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"train.tracker={name} needs the {module} package: pip install -e \".[{extra}]\"")


class TensorBoard:
    def __init__(self, workdir: pathlib.Path, resumed_step: int):
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(str(workdir / "tensorboard"), purge_step=resumed_step + 1)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def routing(self, step: int, lbv_LxP: np.ndarray, valid_LxP: np.ndarray) -> None:
        """TensorBoard gets the scalars only; the heatmaps are `python -m rexmoe_jax.plot`'s."""

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, config: Config, workdir: pathlib.Path):
        import wandb

        self.wandb = wandb
        id_file = workdir / WANDB_RUN_ID
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(6)
        try:
            id_file.write_text(run_id + "\n")
        except OSError as err:
            raise WriteError(f"{failure_reason(err)} while writing {id_file}") from None
        train = config.train
        self.run = wandb.init(project=train.project, name=train.run_name or workdir.resolve().name, id=run_id,
                              resume="allow", dir=str(workdir), config=config.to_dict(),
                              tags=[t for t in train.tags.split(",") if t] or None)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def routing(self, step: int, lbv_LxP: np.ndarray, valid_LxP: np.ndarray) -> None:
        self.run.log({"expert_load_lbv": self.wandb.Image(
            heatmap(lbv_LxP, valid_LxP), caption=f"LBV per layer (rows) and pool expert (columns), step {step}: "
                                                 "blue idle, white even, red twice the mean load or more")},
                     step=step)

    def close(self) -> None:
        self.run.finish()


def heatmap(lbv_LxP: np.ndarray, valid_LxP: np.ndarray, cell: int = 8) -> np.ndarray:
    """An RGB image (uint8) of LBV per layer and expert: -1 (idle) blue, 0 white, +1 and above
    red; experts outside a layer's pool grey. Each entry is a cell x cell square."""
    t = np.clip(np.asarray(lbv_LxP, np.float64), -1.0, 1.0)[..., None]
    white, blue, red = np.ones(3), np.array([0.13, 0.4, 0.8]), np.array([0.8, 0.15, 0.15])
    rgb = np.where(t < 0, white + (blue - white) * -t, white + (red - white) * t)
    rgb = np.where(np.asarray(valid_LxP)[..., None], rgb, 0.6)
    return np.repeat(np.repeat((rgb * 255).round().astype(np.uint8), cell, axis=0), cell, axis=1)


def open_trackers(config: Config, workdir: pathlib.Path, resumed_step: int) -> list:
    opened = []
    for name in chosen(config.train):
        opened.append(TensorBoard(workdir, resumed_step) if name == "tensorboard" else WandB(config, workdir))
    return opened

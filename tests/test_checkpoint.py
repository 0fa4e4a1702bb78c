"""The checkpointer on its own: which config changes a checkpoint resumes under, and falling
back from an unreadable checkpoint to the previous one."""

import jax
import jax.numpy as jnp
import numpy as np

from rexmoe_jax.checkpoint import Checkpointer, config_changes
from rexmoe_jax.config import Config, apply_overrides


def test_config_changes_follow_the_sections():
    saved = Config().to_dict()
    changed = apply_overrides(Config(), ["compute.dtype=bfloat16", "compute.dispatch=capacity",
                                         "train.steps=500", "optim.clip_norm=0.5", "psr.schedule=linear"])
    incompatible, other = config_changes(saved, changed)
    assert incompatible == []
    assert {c.split(":")[0] for c in other} == {"compute.dtype", "compute.dispatch", "train.steps",
                                                "optim.clip_norm", "psr.schedule"}
    incompatible, _ = config_changes(saved, apply_overrides(Config(), ["model.d_model=64", "optim.clip_norm=0"]))
    assert [c.split(":")[0] for c in incompatible] == ["model.d_model", "optim.clip_norm"]
    # A config.json from before the compute section: its model.dtype is a compute change.
    legacy = Config().to_dict()
    legacy["model"]["dtype"] = "bfloat16"
    del legacy["compute"]
    assert config_changes(legacy, Config()) == ([], ["compute.dtype: 'bfloat16' -> 'float32'"])


def test_unreadable_checkpoint_is_set_aside_and_the_previous_one_restored(tmp_path, capsys):
    state = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones((3,))}
    checkpointer = Checkpointer(tmp_path, keep=3)
    for step in (1, 2):
        checkpointer.save(step, jax.tree.map(lambda x, s=step: x * s, state), {"step": step, "config": {}})
    checkpointer.close()
    # Garble every array file of checkpoint 2.
    for path in (tmp_path / "checkpoints" / "2" / "state").rglob("*"):
        if path.is_file() and "METADATA" not in path.name:
            path.write_bytes(b"garbage")
    checkpointer = Checkpointer(tmp_path, keep=3)
    restored, meta = checkpointer.restore(jax.eval_shape(lambda: state), Config())
    checkpointer.close()
    assert meta["step"] == 1
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(6.0).reshape(2, 3))
    assert (tmp_path / "checkpoints" / "2.corrupt").is_dir()
    assert "checkpoint 2 is unreadable" in capsys.readouterr().err


def test_no_checkpoint_restores_nothing(tmp_path):
    checkpointer = Checkpointer(tmp_path, keep=3)
    assert checkpointer.restore({"w": jax.ShapeDtypeStruct((2,), jnp.float32)}, Config()) is None
    checkpointer.close()


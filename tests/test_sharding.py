"""Meshes on 8 simulated CPU devices: the rules table, one step against one device, the
expert-parallel dispatch against the unsharded one, and checkpoints across meshes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rexmoe_jax import loop, sharding, trainer
from rexmoe_jax.config import Config, ConfigError, MeshConfig, apply_overrides
from rexmoe_jax.model import layers
from rexmoe_jax.optimizer import make_optimizer
from rexmoe_jax.runlog import read_records

assert jax.device_count() == 8, "conftest sets up 8 simulated CPU devices"

MODEL = ["model.vocab_size=64", "model.d_model=32", "model.num_layers=4", "model.num_heads=4",
         "model.num_kv_heads=2", "model.expert_ffn=16", "model.num_experts=4", "model.top_k=2",
         "data.seq_len=8", "data.batch_size=8", "train.steps=10", "optim.warmup_steps=0",
         "optim.learning_rate=1e-2"]
MESHES = {"8x1x1x1": (8, 1, 1, 1), "2x1x4x1 (data x expert)": (2, 1, 4, 1),
          "2x2x2x1 (data x fsdp x expert)": (2, 2, 2, 1), "2x1x2x2 (data x expert x tensor)": (2, 1, 2, 2)}
FAST_MESH = "2x2x2x1 (data x fsdp x expert)"  # the fast tier's case, at r = 4; the others are e2e


def mesh_overrides(sizes):
    return [f"mesh.{axis}={size}" for axis, size in zip(sharding.MESH_AXES, sizes)]


def loss_and_grads(cfg, mesh):
    """Loss, metrics and gradients of one step's loss on `mesh`, as host arrays."""
    model = trainer.build_model(cfg)
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    state = trainer.init_state(cfg, model, tx, trainer.state_shardings(cfg, model, tx, mesh))
    tokens = np.random.default_rng(0).integers(0, 64, (8, cfg.data.seq_len + 1)).astype(np.int32)
    grad_fn = jax.value_and_grad(trainer.make_loss_fn(cfg, model), has_aux=True)
    with sharding.activate(mesh):
        (total, aux), grads = jax.jit(grad_fn)(state.params, sharding.put_batch(tokens, mesh), jnp.asarray(3))
    return jax.device_get((total, aux, grads))


@functools.cache
def one_device(reuse):
    cfg = apply_overrides(Config(), MODEL + [f"model.reuse={reuse}", "psr.schedule=linear", "psr.end_step=20"])
    return loss_and_grads(cfg, sharding.make_mesh(MeshConfig(num_devices=1)))


@pytest.mark.parametrize("reuse", [pytest.param(1, marks=pytest.mark.e2e), 4])
@pytest.mark.parametrize("mesh_name", [pytest.param(m, marks=() if m == FAST_MESH else pytest.mark.e2e)
                                       for m in MESHES])
def test_one_step_equals_one_device(reuse, mesh_name):
    """The loss and every gradient match one device within 1e-5 (relative, float32), with the
    PSR mask of step 3 applied."""
    assert_matches_one_device(reuse, mesh_overrides(MESHES[mesh_name]))


@pytest.mark.e2e
@pytest.mark.parametrize("mesh_name", ["2x1x4x1 (data x expert)", "2x1x2x2 (data x expert x tensor)"])
def test_ragged_exchange_equals_one_device(mesh_name):
    """The dropless ragged exchange (the default on GPU and TPU; emulated on CPU) in the whole
    model, against the unsharded model."""
    assert_matches_one_device(4, mesh_overrides(MESHES[mesh_name]) + ["compute.expert_exchange=ragged"])


def test_flash_attention_on_a_mesh_equals_xla_on_one_device():
    """The flash kernel (TPU interpret mode here) inside the model on a data x expert x tensor
    mesh, each device running it on its own rows and heads: loss and gradients match the XLA
    attention unsharded, over 256 tokens (two of the kernel's blocks of 128)."""
    flash, xla = (apply_overrides(Config(), MODEL + ["data.seq_len=256", "model.reuse=2",
                                                     f"compute.attention={a}"] + overrides)
                  for a, overrides in (("flash", mesh_overrides((2, 1, 2, 2))), ("xla", [])))
    assert layers.flash_applies(flash.compute, 256) and not layers.flash_applies(xla.compute, 256)
    ref_total, ref_aux, ref_grads = loss_and_grads(xla, sharding.make_mesh(MeshConfig(num_devices=1)))
    total, aux, grads = loss_and_grads(flash, sharding.make_mesh(flash.mesh))
    np.testing.assert_allclose(total, ref_total, rtol=1e-5)
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        ref = _at(ref_grads, path)
        assert np.linalg.norm(g - ref) <= 1e-5 * np.linalg.norm(ref), jax.tree_util.keystr(path)


def assert_matches_one_device(reuse, overrides):
    cfg = apply_overrides(Config(), MODEL + [f"model.reuse={reuse}", "psr.schedule=linear", "psr.end_step=20"]
                          + overrides)
    ref_total, ref_aux, ref_grads = one_device(reuse)
    total, aux, grads = loss_and_grads(cfg, sharding.make_mesh(cfg.mesh))
    np.testing.assert_allclose(total, ref_total, rtol=1e-5)
    for name in ("loss", "lb_loss", "z_loss"):
        np.testing.assert_allclose(aux[name], ref_aux[name], rtol=1e-5, err_msg=name)
    np.testing.assert_array_equal(aux["expert_load"], ref_aux["expert_load"])
    assert float(aux["dropped"]) == 0.0
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        ref = _at(ref_grads, path)
        assert np.linalg.norm(g - ref) <= 1e-5 * np.linalg.norm(ref), jax.tree_util.keystr(path)


def _at(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


def test_parameter_shardings_follow_the_rules_table():
    """Each parameter's mesh axes, written out by hand from the design (vocabulary and FFN width
    over tensor, d_model over fsdp, experts over expert; groups, layers, pool, norms and
    head_dim replicated), on a data 1 x fsdp 2 x expert 2 x tensor 2 mesh."""
    cfg = apply_overrides(Config(), MODEL + ["model.reuse=2"] + mesh_overrides((1, 2, 2, 2)))
    mesh = sharding.make_mesh(cfg.mesh)
    model = trainer.build_model(cfg)
    tx = make_optimizer(cfg.optim, 10)
    specs = jax.tree.map(lambda s: tuple(s.spec), trainer.state_shardings(cfg, model, tx, mesh).params)
    expected = {
        ("token_embed",): ("tensor", "fsdp"),
        ("lm_head",): ("fsdp", "tensor"),
        ("groups", "experts_gate"): (None, "expert", "fsdp", "tensor"),
        ("groups", "experts_down"): (None, "expert", "tensor", "fsdp"),
        ("groups", "layers", "moe", "router"): (None, None, "fsdp", None),
        ("groups", "layers", "attention", "query"): (None, None, "fsdp", "tensor", None),
        ("groups", "layers", "attention", "out"): (None, None, "tensor", None, "fsdp"),
        ("groups", "layers", "attn_norm", "scale"): (None, None, None),
    }
    for path, axes in expected.items():
        spec = specs
        for key in path:
            spec = spec[key]
        assert tuple(spec) + (None,) * (len(axes) - len(spec)) == axes, path


def test_mesh_errors_name_the_fix():
    with pytest.raises(ConfigError, match="multiply to 6"):
        sharding.make_mesh(MeshConfig(data=3, expert=2))
    cfg = apply_overrides(Config(), MODEL + ["data.batch_size=6"] + mesh_overrides((2, 1, 4, 1)))
    with pytest.raises(ConfigError, match="data.batch_size / optim.grad_accum = 6"):
        sharding.validate(cfg, sharding.make_mesh(cfg.mesh))
    cfg = apply_overrides(Config(), MODEL + ["model.num_experts=3", "model.reuse=1"] + mesh_overrides((2, 1, 4, 1)))
    with pytest.raises(ConfigError, match="mesh.expert=4"):
        sharding.validate(cfg, sharding.make_mesh(cfg.mesh))
    # The output head splits the vocabulary over the tensor axis.
    cfg = apply_overrides(Config(), MODEL + ["model.vocab_size=65"] + mesh_overrides((4, 1, 1, 2)))
    with pytest.raises(ConfigError, match=r"model\.vocab_size=65 must divide over mesh\.tensor=2"):
        sharding.validate(cfg, sharding.make_mesh(cfg.mesh))


TRAIN = MODEL + ["model.vocab_size=4096", "model.reuse=2", "psr.schedule=linear", "psr.start_step=2",
                 "psr.end_step=6", "train.log_every=1", "train.eval_every=100", "train.eval_batches=1",
                 "train.sample_tokens=0", "optim.learning_rate=3e-3"]


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    import json

    from rexmoe_jax.data import read_embedded_documents

    path = tmp_path_factory.mktemp("corpus") / "kjv100.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in read_embedded_documents()[:100]))
    return f"data.corpus={path}"


def losses(workdir):
    return np.array([r["loss"] for r in read_records(workdir / "metrics.jsonl") if "loss" in r])


@pytest.mark.e2e
def test_training_curve_matches_one_device_and_resumes_on_another_mesh(tmp_path, corpus_file):
    """The issue's command (data=2, expert=4 on 8 devices) gives one device's loss curve; a
    checkpoint written on that mesh resumes on data=8 and the curve continues."""
    single = loop.run(apply_overrides(Config(), TRAIN + [corpus_file, "mesh.num_devices=1"]), tmp_path / "one")
    assert single["step"] == 10
    ep = tmp_path / "ep"
    from rexmoe_jax.runtime.preemption import StopRequest

    class StopAt(StopRequest):
        def requested(self, step):
            return step >= 5

    loop.run(apply_overrides(Config(), TRAIN + [corpus_file, "mesh.data=2", "mesh.expert=4"]), ep, stop=StopAt())
    loop.run(apply_overrides(Config(), TRAIN + [corpus_file, "mesh.data=8"]), ep)
    np.testing.assert_allclose(losses(ep), losses(tmp_path / "one"), rtol=2e-4)
    assert len(losses(ep)) == 10


def test_target_meshes_split_physical_axes_span_slices_and_set_the_platform(tpu_devices):
    from rexmoe_jax.config import ComputeConfig
    from rexmoe_jax.model import dispatch

    # A v5p-128 is a 4x4x4 torus: axes of 8 need two physical axes' parts.
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=8, expert=8), tpu_devices("v5p-128"))
    assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "expert": 8, "tensor": 1}
    assert len({d.id for d in mesh.devices.flat}) == 64
    # Two slices: the data axis spans them, every other axis stays within one slice.
    mesh = sharding.make_mesh(MeshConfig(data=2, expert=8), tpu_devices("2xv5p-16"))
    assert [{d.slice_index for d in mesh.devices[i].flat} for i in range(2)] == [{0}, {1}]
    assert sharding.platform() == "cpu"
    with sharding.activate(mesh):
        assert sharding.platform() == "tpu"  # what a TPU would run, though this machine is a CPU
        assert dispatch.choose_path(ComputeConfig(), 1.0).exchange == "ragged"
        assert dispatch.choose_path(ComputeConfig(dispatch="capacity"), 1.0).exchange == "fixed"
        assert dispatch.choose_path(ComputeConfig(), 1.0).permute == "auto"  # the Pallas kernels on v5p
    assert dispatch.choose_path(ComputeConfig(), 1.0).exchange == "fixed"
    with sharding.activate(sharding.make_mesh(MeshConfig(data=4), tpu_devices("v4-8"))):
        assert sharding.device().device_kind == "TPU v4"
        assert dispatch.choose_path(ComputeConfig(), 1.0).permute == "xla"  # Mosaic: no sublane gather
        assert dispatch.choose_path(ComputeConfig(permute="pallas"), 1.0).permute == "pallas"


@pytest.mark.parametrize("target,hosts_of_slice,per_host", [("v5p-64", 8, 4), ("tpu7x-32", 4, 8)])
def test_each_host_of_a_target_slice_reads_the_rows_its_chips_hold(tpu_devices, monkeypatch, target,
                                                                    hosts_of_slice, per_host):
    """The README's pod mesh, fsdp 4 x expert 8, on a v5p-64 (eight hosts of four chips) and a
    tpu7x-32 (four hosts of four chips, two devices each): on the v5p the mesh follows the
    torus, which interleaves the hosts along the batch axes. Each host's blocks of rows are its
    devices' positions on them, read from the mesh's device grid (row-major over data, fsdp,
    expert; tensor 1)."""
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=4, expert=8), tpu_devices(target))
    hosts = [d.process_index for d in mesh.devices.flat]
    assert sorted(set(hosts)) == list(range(hosts_of_slice)) and len(hosts) == 32
    for host in range(hosts_of_slice):
        monkeypatch.setattr(jax, "process_index", lambda host=host: host)
        expected = tuple(i for i, owner in enumerate(hosts) if owner == host)
        assert len(expected) == per_host and sharding.process_rows(mesh, 64) == (expected, 32)
    if target == "v5p-64":
        assert hosts != sorted(hosts), "the hosts no longer interleave here: pick a slice where they do"


def test_tokamax_inside_the_moe_layer_on_tpu_is_one_line(tpu_devices):
    """tokamax's TPU kernels do not compile inside the MoE layer's shard_map (an error from jax
    about manual axes, which would read as a crash): the dispatch choice refuses it by name."""
    from rexmoe_jax.config import ComputeConfig
    from rexmoe_jax.model import dispatch

    with sharding.activate(sharding.make_mesh(MeshConfig(data=4), tpu_devices("v5e-4"))):
        with pytest.raises(ConfigError, match="compute.grouped_matmul=tokamax does not compile on TPU"):
            dispatch.choose_path(ComputeConfig(grouped_matmul="tokamax"), 1.0)
        decoding = ComputeConfig(grouped_matmul="tokamax", dispatch="gather")  # runs no grouped matmul
        assert not dispatch.choose_path(decoding, 1.0).sharded

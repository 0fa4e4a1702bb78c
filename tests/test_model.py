"""The decoder against an independent NumPy implementation, its parameter layout, gradients
through shared pools, and causality."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference
import pytest

from rexmoe_jax.config import ComputeConfig, ModelConfig, PSRConfig
from rexmoe_jax.model import metrics
from rexmoe_jax.model import psr as psr_lib
from rexmoe_jax.model.decoder import Decoder, PSRInputs, param_counts
from rexmoe_jax.reuse import layer_pool_sizes

SMALL = ModelConfig(vocab_size=37, d_model=16, num_layers=5, num_heads=4, num_kv_heads=2,
                    expert_ffn=8, num_experts=4, top_k=2)
DENSE = ComputeConfig(dispatch="dense")


def init(cfg, seed=0, psr=None, compute=DENSE):
    model = Decoder(cfg, compute, psr or PSRConfig())
    tokens = jnp.zeros((1, 4), jnp.int32)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(seed), tokens)["params"])
    # Random norm scales, so that a wrong scale would show (they initialise to ones).
    rng = np.random.default_rng(seed)
    params = jax.tree_util.tree_map_with_path(
        lambda path, p: p * (1 + 0.3 * rng.standard_normal(p.shape, np.float32))
        if "scale" in jax.tree_util.keystr(path) else p, params)
    return model, params


@pytest.mark.parametrize("reuse", [1, 2, 3, 5])
@pytest.mark.parametrize("dispatch", ["dense", "sort"])
def test_matches_numpy_reference(reuse, dispatch):
    """r = 1 is the baseline layer-local MoE; r > 1 pools the group's experts, including the
    smaller last group of L = 5 at r = 2 and r = 3. Checked against a NumPy float64 decoder."""
    cfg = dataclasses.replace(SMALL, reuse=reuse, num_shared_experts=reuse % 2)
    model, params = init(cfg, compute=ComputeConfig(dispatch=dispatch))
    tokens = jax.random.randint(jax.random.key(1), (2, 7), 0, cfg.vocab_size)
    logits, _ = jax.jit(model.apply)({"params": params}, tokens)
    expected, _ = numpy_reference.forward(jax.device_get(params), cfg, tokens)
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=2e-4, atol=2e-5)


def test_routes_over_the_group_pool():
    """Each layer's chosen experts are ids in its group's pool, and across a batch every layer
    of a group picks experts owned by the other layers of the group."""
    cfg = dataclasses.replace(SMALL, reuse=2, num_layers=4, num_experts=4, top_k=2)
    model, params = init(cfg)
    tokens = jax.random.randint(jax.random.key(2), (4, 16), 0, cfg.vocab_size)
    _, state = jax.jit(model.apply, static_argnames="mutable")(
        {"params": params}, tokens, mutable=("intermediates",))
    chosen = np.asarray(state["intermediates"]["groups"]["layers"]["moe"]["experts"][0])
    # chosen: (groups=2, layers=2, tokens, K) with pool ids in [0, 8).
    assert chosen.shape == (2, 2, 64, 2) and chosen.min() >= 0 and chosen.max() < 8
    for g in range(2):
        for j in range(2):
            foreign = set(range(8)) - set(range(j * 4, j * 4 + 4))
            assert foreign & set(chosen[g, j].ravel().tolist()), (g, j)


def test_expert_parameters_do_not_depend_on_reuse():
    """Same expert count and sizes for every r; only the routers grow, by exactly
    sum over layers of D * (pool_l - N)."""
    counts = {}
    for reuse in (1, 2, 3, 4, 5):
        cfg = dataclasses.replace(SMALL, reuse=reuse)
        shapes = jax.eval_shape(lambda cfg=cfg: nn.meta.unbox(Decoder(cfg).init(
            jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]))
        counts[reuse] = param_counts(shapes, cfg)
    d, n, L, f = SMALL.d_model, SMALL.num_experts, SMALL.num_layers, SMALL.expert_ffn
    # Pool sizes per layer written out by hand for L = 5.
    pools = {1: [4] * 5, 2: [8, 8, 8, 8, 4], 3: [12, 12, 12, 8, 8], 4: [16] * 4 + [4], 5: [20] * 5}
    for reuse, pool in pools.items():
        assert counts[reuse]["params_routed_experts"] == L * n * 3 * d * f
        assert counts[reuse]["params_router"] == d * sum(pool)
        growth = counts[reuse]["params_total"] - counts[1]["params_total"]
        assert growth == d * (sum(pool) - L * n)
        np.testing.assert_array_equal(layer_pool_sizes(dataclasses.replace(SMALL, reuse=reuse)), pool)


def test_group_experts_get_gradient_from_every_layer_of_the_group():
    """An expert of a group's pool has a nonzero gradient exactly when some layer of the group
    chose it; each layer chose, on its own, an expert owned by another layer of the group."""
    cfg = dataclasses.replace(SMALL, num_layers=3, reuse=3, num_experts=4, top_k=1)
    apply = jax.jit(lambda m, p, t: m.apply({"params": p}, t, mutable=("intermediates",)), static_argnums=0)

    def exclusive_foreign(chosen):
        per_layer = [set(chosen[j].ravel().tolist()) for j in range(3)]
        only = [per_layer[j] - set().union(*(per_layer[i] for i in range(3) if i != j)) for j in range(3)]
        return per_layer, [only[j] - set(range(j * 4, j * 4 + 4)) for j in range(3)]

    # The property needs an input where every layer alone picks a foreign expert: find one.
    for seed in range(20):
        model, params = init(cfg, seed=seed, compute=ComputeConfig(dispatch="sort"))
        tokens = jax.random.randint(jax.random.key(seed), (1, 8), 0, cfg.vocab_size)
        chosen = np.asarray(apply(model, params, tokens)[1]["intermediates"]["groups"]["layers"]["moe"]
                            ["experts"][0][0])  # (3 layers, T, 1)
        per_layer, foreign = exclusive_foreign(chosen)
        if all(foreign):
            break
    else:
        pytest.fail("no seed gave every layer an exclusive foreign expert")

    def loss(p):
        logits, _ = model.apply({"params": p}, tokens)
        return jnp.sum(logits * jax.random.normal(jax.random.key(5), logits.shape))

    grads = jax.jit(jax.grad(loss))(params)["groups"]["experts_gate"][0]  # (pool=12, D, F)
    has_grad = {p for p in range(12) if np.any(np.asarray(grads[p]) != 0)}
    assert has_grad == set().union(*per_layer)
    for j in range(3):
        assert foreign[j] <= has_grad  # experts only layer j chose, owned by another layer


@pytest.mark.parametrize("dispatch", ["dense", "sort"])
def test_causal_by_gradients(dispatch):
    """The logits at position t have zero gradient with respect to the embeddings of later
    tokens. Every position holds a distinct token id, so embedding rows are positions."""
    cfg = dataclasses.replace(SMALL, reuse=2)
    model, params = init(cfg, compute=ComputeConfig(dispatch=dispatch))
    tokens = jax.random.permutation(jax.random.key(6), cfg.vocab_size)[:8][None].astype(jnp.int32)

    weights_V = jnp.arange(cfg.vocab_size, dtype=jnp.float32)

    def projected_logit(embed, t):
        logits, _ = model.apply({"params": dict(params, token_embed=embed)}, tokens)
        return logits[0, t] @ weights_V

    grad_fn = jax.jit(jax.grad(projected_logit))  # One compile; t is traced.
    influence_SxS = np.stack([np.abs(np.asarray(grad_fn(params["token_embed"], t)[tokens[0]])).sum(-1)
                              for t in range(tokens.shape[1])])  # [t, position]
    for t in range(tokens.shape[1]):
        assert np.all(influence_SxS[t, t + 1:] == 0), (t, influence_SxS[t])
        assert np.all(influence_SxS[t, :t + 1] > 0), (t, influence_SxS[t])


def test_psr_masks_are_applied_only_when_given():
    """With PSR inputs and N_t < pool, no layer picks a masked expert; without, the full pool."""
    cfg = dataclasses.replace(SMALL, reuse=2, num_layers=4, top_k=2)
    psr = PSRConfig(schedule="linear", start_step=10, end_step=20)
    model, params = init(cfg, psr=psr)
    tokens = jax.random.randint(jax.random.key(8), (4, 16), 0, cfg.vocab_size)
    inputs = PSRInputs(jax.random.key(9), jnp.asarray(0))  # t <= t_s: N_t = N = 4 of 8
    _, masked = model.apply({"params": params}, tokens, psr=inputs, mutable=["intermediates"])
    _, full = model.apply({"params": params}, tokens, mutable=["intermediates"])
    pick = lambda s: np.asarray(s["intermediates"]["groups"]["layers"]["moe"]["experts"][0])
    masked_choice, full_choice = pick(masked), pick(full)
    for g in range(2):
        for j in range(2):
            assert len(set(masked_choice[g, j].ravel().tolist())) <= 4
    assert len(set(full_choice.ravel().tolist())) > 4


def _moe_choices(state, block="groups"):
    """Chosen pool ids (groups, layers, T, K) of a block, from the sown intermediates."""
    return np.asarray(state["intermediates"][block]["layers"]["moe"]["experts"][0])


@pytest.mark.parametrize("order", ["uniform", "local_first"])
def test_each_layer_draws_the_mask_of_its_own_layer_id(order):
    """Every layer routes under psr.available(key, l, ...) for its own id l (a group whose layers
    all received the group's first id would share one mask, and with local_first rank that
    layer's experts first for all). L = 5 at r = 2: groups (0, 1), (2, 3) and a last group (4)."""
    cfg = dataclasses.replace(SMALL, reuse=2, num_layers=5)
    psr = PSRConfig(schedule="linear", start_step=10, end_step=20, order=order)
    model, params = init(cfg, psr=psr)
    tokens = jax.random.randint(jax.random.key(12), (2, 8), 0, cfg.vocab_size)
    key = jax.random.key(13)
    # Step 13 of a 10 -> 20 ramp at r = 2, N = 4: N_t = floor((1 + 3/10) * 4) = 5 of 8 (Eq. 6);
    # the last group's pool is its own 4 experts, all available.
    (_, stats), state = model.apply({"params": params}, tokens, psr=PSRInputs(key, jnp.asarray(13)),
                                    mutable=["intermediates"])
    choices = [_moe_choices(state)[l // 2, l % 2] for l in range(4)] + [_moe_choices(state, "last_group")[0, 0]]
    for layer, (pool, n_t) in enumerate([(8, 5)] * 4 + [(4, 4)]):
        want = np.asarray(psr_lib.available(key, jnp.asarray(layer), jnp.asarray(n_t), psr=psr, pool_size=pool,
                                            num_experts=4, reuse_factor=2, num_tokens=16))[0]
        assert want.sum() == n_t
        np.testing.assert_array_equal(np.asarray(stats.available_P)[layer, :pool] > 0, want, err_msg=str(layer))
        assert np.all(want[choices[layer]]), layer  # every choice is one the layer's own mask allows


def test_cross_layer_share_against_a_hand_count():
    """The share of a layer's picks that are experts owned by another layer of its group, counted
    by hand from the chosen ids, equals metrics.foreign_share of the layer's loads. Under
    local_first at N_t = N each layer sees only its own experts: the share is 0 for every layer
    (it would be 1 for a layer that took another layer's id); on the full pool it is not."""
    cfg = dataclasses.replace(SMALL, reuse=2, num_layers=4)
    psr = PSRConfig(schedule="linear", start_step=10, end_step=20, order="local_first")
    model, params = init(cfg, psr=psr)
    tokens = jax.random.randint(jax.random.key(14), (4, 16), 0, cfg.vocab_size)
    for inputs, masked in [(PSRInputs(jax.random.key(15), jnp.asarray(0)), True), (None, False)]:
        (_, stats), state = model.apply({"params": params}, tokens, psr=inputs, mutable=["intermediates"])
        chosen = _moe_choices(state)
        hand = np.asarray([np.mean(chosen[l // 2, l % 2].ravel() // 4 != l % 2) for l in range(4)])
        np.testing.assert_allclose(metrics.foreign_share(stats.expert_load_P, 4, 2), hand, atol=1e-6)
        if masked:
            np.testing.assert_array_equal(hand, 0.0)
        else:
            assert np.all(hand > 0), hand


@pytest.mark.e2e
@pytest.mark.parametrize("remat", ["full", "save_dots"])
def test_remat_policies_leave_gradients_unchanged(remat):
    cfg = dataclasses.replace(SMALL, num_layers=2, reuse=2)
    model, params = init(cfg, compute=ComputeConfig(dispatch="sort"))
    tokens = jax.random.randint(jax.random.key(10), (2, 6), 0, cfg.vocab_size)

    def grads(m):
        return jax.jit(jax.grad(lambda p: jnp.sum(m.apply({"params": p}, tokens)[0] ** 2)))(params)

    rematted = Decoder(cfg, ComputeConfig(dispatch="sort", remat=remat), model.psr)
    for a, b in zip(jax.tree.leaves(grads(model)), jax.tree.leaves(grads(rematted))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_bfloat16_compute_keeps_float32_parameters():
    """bf16 activations and matmuls, float32 parameters and logits, close to the float32 model."""
    cfg = dataclasses.replace(SMALL, num_layers=2, reuse=2)
    model, params = init(cfg)
    tokens = jax.random.randint(jax.random.key(11), (2, 6), 0, cfg.vocab_size)
    bf16 = Decoder(cfg, ComputeConfig(dispatch="dense", dtype="bfloat16"), model.psr)
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype("float32")}
    low, _ = jax.jit(bf16.apply)({"params": params}, tokens)
    high, _ = jax.jit(model.apply)({"params": params}, tokens)
    assert low.dtype == jnp.float32
    rel = float(jnp.linalg.norm(low - high) / jnp.linalg.norm(high))
    assert 0 < rel < 2e-2  # bf16 rounding shows, but stays at bf16's precision

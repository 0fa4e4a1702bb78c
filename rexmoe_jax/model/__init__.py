"""The model: a decoder whose MoE layers route over their group's pool of experts.

    decoder.py          embed -> scan over groups of r layers -> norm -> logits; the parameter
                        layout and the logical axis names
    layers.py           RMSNorm, rotary embeddings, grouped-query attention, SwiGLU
    moe.py              the MoE layer: router, PSR mask, dispatch, shared experts
    dispatch.py         routing (Eq. 2-3) and the dispatch paths; `choose_path` and
                        `compute_for` are where compute.dispatch is read
    expert_parallel.py  the dispatch on a mesh: tokens to their experts' devices and back
    collectives.py      ragged_all_to_all on every backend
    psr.py              Progressive Scaling Routing's traced pool size and masks (Eq. 6)
    losses.py           cross-entropy, load-balancing loss, router z-loss
    balancing.py        the auxiliary-loss-free router bias
    metrics.py          LBV, under-used experts, picks of other layers' experts, MFU

Groups and pools themselves (Eq. 4) are rexmoe_jax/reuse.py, below the config, which uses them.

Shape letters. Arrays are named with their shape (x_BxSxD: batch x sequence x model width);
every file of the project, kernels included, uses these letters and only these meanings:

    A  assignments: the T*K (token, chosen expert) pairs
    B  batch: sequences
    C  rows per bucket: capacity slots of an expert or destination, rows of a block
    D  model width (d_model)
    E  buckets rows are sorted into: a grouped matmul's groups, a slotted dispatch's experts
       or destination devices, the slices of an exchange between devices
    F  expert hidden width (or the fused shared experts' width)
    G  groups of layers (L / r, rounded up)
    H  query heads
    I  a grouped matmul's input (contracted) width
    J  key/value heads
    K  top-k: experts chosen per token
    L  layers
    M  rows of a source: of a grouped matmul, of a gather's source, of an exchange's operand
    N  experts a layer owns (the paper's N; a full pool holds r*N)
    O  a grouped matmul's output width
    P  pool: a layer's candidate experts (r*N, fewer in a smaller last group)
    Q  query heads per key/value head (H / J)
    R  layers of a group (r, fewer in a smaller last group)
    S  sequence (query) positions; S1 = S + 1 tokens of a training row
    T  tokens: B*S flattened
    U  key/value positions (attention keys: the sequence, or the KV cache)
    V  vocabulary
    W  row blocks of the blocked grouped matmul
    Y  rows of a destination: slots (E buckets x C rows), an exchange's output
    Z  head width

Inside shard_map a letter counts the device's share of its axis. Where a share and its whole
axis meet in one function, the share is the letter with l appended: Pl = P / (devices of the
expert axis), a device's experts of the pool (expert_parallel.py).

This package's modules are imported by name (`from rexmoe_jax.model import moe`,
`from rexmoe_jax.model.decoder import Decoder`); it imports none of them itself.
"""

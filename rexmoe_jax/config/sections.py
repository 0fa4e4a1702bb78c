"""The config's sections: one frozen dataclass per concern, composed into `Config`.

Every class validates itself in `__post_init__`, first each field's type (`check_value`, which
the overrides and config.json use too), then the values, so an invalid combination fails when it
is built, naming the field, before anything is compiled. Derived quantities (pool size, number
of groups, ...) are properties, never stored.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import typing
from typing import ClassVar, Literal

from rexmoe_jax import reuse as reuse_lib
from rexmoe_jax.cli import BadInput


class ConfigError(BadInput):
    """An invalid config, preset or override; the message names the offending field."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def check_value(key: str, value: object, kind) -> object:
    """`value` as a value of the field type `kind` (an int is taken for a float), or a
    ConfigError naming `key`."""
    if typing.get_origin(kind) is Literal:
        choices = typing.get_args(kind)
        require(value in choices, f"{key}={value!r}: expected one of {', '.join(choices)}")
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    require(ok, f"{key}={value!r}: expected {kind.__name__}, got {type(value).__name__}")
    require(kind is not float or math.isfinite(value), f"{key}={value!r}: expected a finite number")
    return value


@functools.cache
def field_types(section: type) -> dict[str, object]:
    """A section's field types (its annotations, resolved once)."""
    return typing.get_type_hints(section)


class _Section:
    """A config section, named `name` in the config. `state_layout()` is the part of it that the
    train state's arrays and structure depend on: a checkpoint resumes under a config whose
    sections all give the same layout, and any other change is only noted."""

    name: ClassVar[str]

    def state_layout(self) -> tuple:
        return ()

    def _check_types(self) -> None:
        """Every field holds a value of its type (a preset may pass anything), so that the checks
        that follow compare numbers with numbers and a wrong field is named."""
        kinds = field_types(type(self))
        for field in dataclasses.fields(self):
            check_value(f"{self.name}.{field.name}", getattr(self, field.name), kinds[field.name])


Dtype = Literal["float32", "bfloat16"]
RematPolicy = Literal["none", "full", "save_dots", "save_dots_no_batch"]
Dispatch = Literal["dense", "sort", "capacity", "gather"]
GroupedMatmul = Literal["auto", "ragged_dot", "blocked", "tokamax", "reference"]
Permute = Literal["auto", "xla", "pallas", "reference"]
ExpertExchange = Literal["auto", "ragged", "fixed"]
Attention = Literal["auto", "xla", "flash"]
FFN = Literal["moe", "dense"]


@dataclasses.dataclass(frozen=True)
class ModelConfig(_Section):
    """The decoder and its MoE layers (Sec. 1-2 of the method digest)."""

    name: ClassVar[str] = "model"

    vocab_size: int = 4096
    d_model: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 0  # 0 means d_model // num_heads.
    expert_ffn: int = 256
    num_experts: int = 8  # N: routed experts owned by each layer.
    top_k: int = 2  # K
    num_shared_experts: int = 0
    reuse: int = 1  # r: layers per group; a layer routes over its group's r*N experts.
    renormalize_gates: bool = False  # The paper does not renormalise the K gates (Eq. 3).
    # Auxiliary-loss-free balancing (DeepSeek-V3): a per-layer bias over the pool that shifts
    # which experts are chosen, never the gates; the trainer moves it by loss.router_bias_rate.
    router_bias: bool = False
    rope_base: float = 10_000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    # "dense": every layer's FFN is one SwiGLU of width `dense_ffn` instead of routed experts:
    # the dense model with the MoE's active FLOPs, which an MoE's speed is compared with.
    ffn: FFN = "moe"

    def __post_init__(self):
        self._check_types()
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads",
                     "expert_ffn", "num_experts", "top_k"):
            require(getattr(self, name) >= 1, f"model.{name} must be >= 1, got {getattr(self, name)}")
        require(self.reuse >= 1, f"model.reuse (r) must be >= 1, got {self.reuse}")
        require(self.reuse <= self.num_layers,
                 f"model.reuse={self.reuse} exceeds model.num_layers={self.num_layers}; "
                 "a group cannot hold more layers than the model has")
        require(self.top_k <= self.num_experts,
                 f"model.top_k={self.top_k} exceeds model.num_experts={self.num_experts}")
        require(self.num_heads % self.num_kv_heads == 0,
                 f"model.num_heads={self.num_heads} is not divisible by "
                 f"model.num_kv_heads={self.num_kv_heads}")
        require(self.head_dim >= 0, f"model.head_dim must be >= 0, got {self.head_dim}")
        require(self.head_dim > 0 or self.d_model % self.num_heads == 0,
                 f"model.d_model={self.d_model} is not divisible by model.num_heads="
                 f"{self.num_heads}; set model.head_dim explicitly")
        require(self.resolved_head_dim % 2 == 0,
                 f"head dimension {self.resolved_head_dim} must be even for rotary embeddings")
        require(self.num_shared_experts >= 0, "model.num_shared_experts must be >= 0")
        require(self.rope_base > 0, "model.rope_base must be > 0")
        require(self.norm_eps > 0, "model.norm_eps must be > 0")
        require(self.init_std > 0, "model.init_std must be > 0")
        require(self.ffn == "moe" or self.reuse == 1,
                 f"model.ffn=dense has no experts to reuse; set model.reuse=1, not {self.reuse}")
        require(self.ffn == "moe" or not self.router_bias,
                 "model.ffn=dense has no router to bias; set model.router_bias=false")

    @property
    def dense_ffn(self) -> int:
        """(K + shared experts) * F: the hidden width a token uses in an MoE layer, and the
        width of a dense layer (model.ffn=dense) with the same FLOPs apart from the router."""
        return (self.top_k + self.num_shared_experts) * self.expert_ffn

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def pool_size(self) -> int:
        """r*N: the candidate experts of a layer in a full group."""
        return self.reuse * self.num_experts

    @property
    def group_sizes(self) -> tuple[int, ...]:
        """Layers per group; the last group is smaller when r does not divide L."""
        return reuse_lib.group_sizes(self.num_layers, self.reuse)

    @property
    def num_groups(self) -> int:
        return len(self.group_sizes)

    def state_layout(self) -> tuple:
        """What the train state's arrays depend on: every architecture field."""
        return dataclasses.astuple(self)


@dataclasses.dataclass(frozen=True)
class ComputeConfig(_Section):
    """How the model is computed: none of it changes what a checkpoint holds, so a run may
    resume under other settings (bf16 instead of float32, another dispatch, remat)."""

    name: ClassVar[str] = "compute"

    dtype: Dtype = "float32"  # Activations and matmul inputs; parameters stay float32.
    remat: RematPolicy = "none"
    # "sort": dropless (permute -> grouped matmuls -> combine); "capacity": fixed slots per
    # expert, one batched einsum, overflow dropped; "gather": each token's K experts' weights
    # gathered (for a few tokens: decoding); "dense": every expert on every token (the oracle).
    dispatch: Dispatch = "sort"
    grouped_matmul: GroupedMatmul = "auto"  # The "sort" dispatch's expert matmuls (auto: per backend).
    # The token gathers around them (pallas_kernels/token_permute); auto: the Pallas kernels on
    # GPU and TPU (Hopper and v5e on), XLA's gathers on CPU (where Pallas only interprets).
    permute: Permute = "auto"
    # How tokens travel to their experts' devices when mesh.expert > 1: "ragged" sends each device
    # exactly its rows (dropless; ragged_all_to_all), "fixed" in equal buffers sized by
    # capacity_factor; "auto" is ragged on GPU and TPU, fixed on CPU (which lacks the op) and
    # with the "capacity" dispatch, whose cap on an expert axis is the fixed exchange's.
    expert_exchange: ExpertExchange = "auto"
    # Slots per expert ("capacity" dispatch, one expert device) or per destination device (the
    # "fixed" exchange, mesh.expert > 1), as a multiple of the even share of the T*K assignments;
    # 0 sizes them so nothing can be dropped.
    capacity_factor: float = 0.0
    # Causal self-attention: "xla" writes each layer's S x S scores to memory (any length, KV
    # cache, packed segments); "flash" is the blockwise Pallas TPU kernel (pallas_kernels/attention:
    # Mosaic on TPU, interpret mode on CPU for tests, refused on GPU), used where it applies
    # (training and evaluation rows, S a multiple of 128) and "xla" elsewhere; "auto" is "flash"
    # on TPU and "xla" on CPU and GPU.
    attention: Attention = "auto"

    def __post_init__(self):
        self._check_types()
        require(self.capacity_factor >= 0, "compute.capacity_factor must be >= 0")
        require(self.dispatch != "capacity" or self.expert_exchange != "ragged",
                "compute.dispatch=capacity caps what each expert device receives, which the ragged exchange "
                "does not (it sends every row); use compute.expert_exchange=fixed or auto")


PSRSchedule = Literal["none", "linear", "stepwise"]
MaskGranularity = Literal["layer", "token"]
MaskOrder = Literal["uniform", "local_first"]
BalanceOver = Literal["available", "pool"]


@dataclasses.dataclass(frozen=True)
class PSRConfig(_Section):
    """Progressive Scaling Routing (Sec. 3): which pool experts a layer may select at step t."""

    name: ClassVar[str] = "psr"

    schedule: PSRSchedule = "none"
    start_step: int = 0  # t_s
    end_step: int = 1  # t_e
    stages: int = 0  # "stepwise" only; 0 means r - 1 stages (each adds N experts).
    initial_experts: int = 0  # Pool size up to t_s; 0 means N, the paper's choice.
    granularity: MaskGranularity = "layer"  # One mask per (layer, step), or per token.
    order: MaskOrder = "uniform"  # "local_first" keeps the layer's own N experts available.
    # The balancing loss under a mask: over the N_t available experts (masked logits get no
    # gradient from it), or over the whole pool (see losses.load_balancing_loss).
    balance_over: BalanceOver = "available"

    def __post_init__(self):
        self._check_types()
        require(self.start_step >= 0, f"psr.start_step must be >= 0, got {self.start_step}")
        require(self.start_step < self.end_step,
                 f"psr.start_step={self.start_step} must be < psr.end_step={self.end_step}")
        require(self.stages >= 0, f"psr.stages must be >= 0, got {self.stages}")
        require(self.initial_experts >= 0,
                 f"psr.initial_experts must be >= 0, got {self.initial_experts}")


@dataclasses.dataclass(frozen=True)
class LossConfig(_Section):
    """Auxiliary router losses (a project decision: the paper names none)."""

    name: ClassVar[str] = "loss"

    # Switch-style f.P loss per layer, averaged over layers; under PSR over the available experts
    # (psr.balance_over). 0 turns it off.
    load_balance: float = 0.01
    z_loss: float = 0.001  # Router z-loss (logsumexp of router logits, squared); 0 turns it off.
    # With model.router_bias: the bias's step per update, in router-logit units (DeepSeek-V3's
    # bias update speed gamma = 0.001); 0 freezes it.
    router_bias_rate: float = 0.001

    def __post_init__(self):
        self._check_types()
        require(self.load_balance >= 0, "loss.load_balance must be >= 0")
        require(self.z_loss >= 0, "loss.z_loss must be >= 0")
        require(self.router_bias_rate >= 0, "loss.router_bias_rate must be >= 0")


LRSchedule = Literal["cosine", "wsd", "linear", "constant"]


@dataclasses.dataclass(frozen=True)
class OptimConfig(_Section):
    """AdamW with a linear warm-up and then, by default, cosine decay: the paper's recipe (Sec. 5)."""

    name: ClassVar[str] = "optim"

    learning_rate: float = 3e-4  # The peak, reached at the end of the warm-up.
    # After the warm-up: cosine or linear decay to min_lr_ratio * peak at train.steps; constant
    # at the peak; or wsd (warm-up, stable, decay): the peak until the last decay_fraction of
    # train.steps, then linear decay to min_lr_ratio * peak.
    schedule: LRSchedule = "cosine"
    min_lr_ratio: float = 0.1  # The decay ends at this fraction of the peak.
    decay_fraction: float = 0.2  # schedule=wsd: the share of train.steps spent decaying.
    warmup_steps: int = 100
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0  # 0 turns clipping off.
    grad_accum: int = 1  # Micro-batches per optimizer step.

    def __post_init__(self):
        self._check_types()
        require(self.learning_rate > 0, "optim.learning_rate must be > 0")
        require(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio must be in [0, 1]")
        require(0 < self.decay_fraction <= 1, "optim.decay_fraction must be in (0, 1]")
        require(self.warmup_steps >= 0, "optim.warmup_steps must be >= 0")
        require(0 <= self.b1 < 1 and 0 <= self.b2 < 1, "optim.b1 and optim.b2 must be in [0, 1)")
        require(self.weight_decay >= 0, "optim.weight_decay must be >= 0")
        require(self.clip_norm >= 0, "optim.clip_norm must be >= 0")
        require(self.grad_accum >= 1, "optim.grad_accum must be >= 1")

    def state_layout(self) -> tuple:
        """Clipping on or off changes the optimizer state's structure; its threshold does not."""
        return (self.clip_norm > 0,)


TxtDocuments = Literal["file", "paragraph", "line"]


@dataclasses.dataclass(frozen=True)
class DataConfig(_Section):
    """Where tokens come from. Empty paths mean the corpus and tokenizer shipped in the package.

    `corpus` is a prepared folder (python -m rexmoe_jax.data prepare), or a file, folder or glob
    of .txt, .jsonl, .parquet (text) or .npy, .arrayrecord (token) files.
    """

    name: ClassVar[str] = "data"

    corpus: str = ""
    tokenizer: str = ""  # tokenizer.json or SentencePiece .model
    text_field: str = "text"  # The JSON Lines field or Parquet column holding the text.
    txt_documents: TxtDocuments = "file"  # A .txt file is one document, or one per paragraph/line.
    seq_len: int = 128
    batch_size: int = 16  # Global sequences per optimizer step.
    eval_fraction: float = 0.02  # Share of documents held out, chosen by seed.
    # More sets evaluated beside the held-out split at every evaluation: NAME=PATH, comma-
    # separated (text or token files, a folder or a glob, as data.corpus; the run's tokenizer).
    eval_sets: str = ""
    # Documents are packed end to end, each ended by the tokenizer's end-of-document token. With
    # document_masking a token attends only to earlier tokens of its own document, and positions
    # restart at each (training and evaluation; XLA attention, as the flash kernel masks by index).
    document_masking: bool = False

    @property
    def eval_set_paths(self) -> dict[str, str]:
        """data.eval_sets as {name: path}, in the order given."""
        return dict(item.split("=", 1) for item in self.eval_sets.split(",") if item)

    def __post_init__(self):
        self._check_types()
        require(self.seq_len >= 2, f"data.seq_len must be >= 2, got {self.seq_len}")
        require(self.batch_size >= 1, f"data.batch_size must be >= 1, got {self.batch_size}")
        require(0 < self.eval_fraction < 1, "data.eval_fraction must be in (0, 1)")
        names = []
        for item in (item for item in self.eval_sets.split(",") if item):
            name, _, path = item.partition("=")
            require(re.fullmatch(r"[A-Za-z0-9_.-]+", name) is not None and path != "",
                     f"data.eval_sets: {item!r} is not NAME=PATH (a name of letters, digits, _ . -)")
            require(name not in names, f"data.eval_sets names {name!r} twice; give each set its own name")
            names.append(name)


@dataclasses.dataclass(frozen=True)
class MeshConfig(_Section):
    """Device mesh axis sizes; -1 means 'the remaining devices' (at most one axis)."""

    name: ClassVar[str] = "mesh"

    data: int = -1
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1
    num_devices: int = 0  # Devices to use, the first ones of jax.devices(); 0 means all.

    @property
    def axis_sizes(self) -> tuple[int, int, int, int]:
        return (self.data, self.fsdp, self.expert, self.tensor)

    def __post_init__(self):
        self._check_types()
        sizes = self.axis_sizes
        require(all(s == -1 or s >= 1 for s in sizes), "mesh axis sizes must be >= 1 or -1")
        require(sizes.count(-1) <= 1, "at most one mesh axis may be -1")
        require(self.num_devices >= 0, "mesh.num_devices must be >= 0")


NonFinite = Literal["stop", "skip"]
TRACKERS = ("jsonl", "tensorboard", "wandb")  # jsonl (metrics.jsonl) is always on.


@dataclasses.dataclass(frozen=True)
class TrainConfig(_Section):
    """The run: length, seed and the host loop's cadences."""

    name: ClassVar[str] = "train"

    steps: int = 300
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 4
    checkpoint_every: int = 0  # 0: only at the end.
    keep_checkpoints: int = 3  # The newest ones kept; older ones are deleted, except:
    keep_every: int = 0  # checkpoints at multiples of this step are kept too (0: none).
    nonfinite: NonFinite = "stop"  # A non-finite loss or gradient: stop, or skip that update.
    sample_tokens: int = 48  # Tokens generated at the end of training; 0 skips the sample.
    sample_prompt: str = "And God said"
    # Where metrics go besides metrics.jsonl (always written): "tensorboard", "wandb", comma-
    # separated; "" means TensorBoard when tensorboardX is installed.
    tracker: str = ""
    run_name: str = ""  # The tracker's name for the run; "" means the workdir's name.
    project: str = "rexmoe-jax"  # The W&B project.
    tags: str = ""  # W&B tags, comma-separated.
    peak_flops: float = 0.0  # A device's peak FLOP/s for MFU where its kind is unknown; 0: the table's.
    profile_steps: str = ""  # "A,B": a jax.profiler trace of steps A to B in WORKDIR/profile.
    profile_process: int = 0  # The process that traces; -1 means every process.

    @property
    def trackers(self) -> tuple[str, ...]:
        return tuple(name for name in self.tracker.split(",") if name)

    def logs_at(self, step: int) -> bool:
        """Whether training writes a metrics line at `step`: every log_every steps, and the last."""
        return step % self.log_every == 0 or step == self.steps

    def evaluates_at(self, step: int) -> bool:
        """Whether training evaluates at `step`: every eval_every steps, and the last."""
        return step % self.eval_every == 0 or step == self.steps

    @property
    def profile_window(self) -> tuple[int, int] | None:
        if not self.profile_steps:
            return None
        first, last = self.profile_steps.split(",")
        return int(first), int(last)

    def __post_init__(self):
        self._check_types()
        require(self.steps >= 1, f"train.steps must be >= 1, got {self.steps}")
        unknown = [name for name in self.trackers if name not in TRACKERS]
        require(not unknown, f"train.tracker: unknown tracker {unknown[0] if unknown else ''!r}; "
                              f"choose from {', '.join(TRACKERS)}, comma-separated")
        require(self.peak_flops >= 0, "train.peak_flops must be >= 0")
        window = re.fullmatch(r"(\d+),(\d+)", self.profile_steps)
        require(not self.profile_steps or (window is not None and 1 <= int(window[1]) <= int(window[2])),
                 f"train.profile_steps={self.profile_steps!r} must be FIRST,LAST steps with 1 <= FIRST <= LAST")
        require(self.profile_process >= -1, "train.profile_process must be a process index or -1 (all)")
        require(self.log_every >= 1, "train.log_every must be >= 1")
        require(self.eval_every >= 1, "train.eval_every must be >= 1")
        require(self.eval_batches >= 1, "train.eval_batches must be >= 1")
        require(self.checkpoint_every >= 0, "train.checkpoint_every must be >= 0")
        require(self.keep_checkpoints >= 1, "train.keep_checkpoints must be >= 1")
        require(self.keep_every >= 0, "train.keep_every must be >= 0")
        saved = f"every {self.checkpoint_every} steps" if self.checkpoint_every else "only at the end"
        multiple = self.checkpoint_every > 0 and self.keep_every % self.checkpoint_every == 0
        require(self.keep_every == 0 or multiple,
                 f"train.keep_every={self.keep_every} keeps checkpoints at its multiples, but they are saved "
                 f"{saved}: give a multiple of train.checkpoint_every (> 0)")
        require(self.sample_tokens >= 0, "train.sample_tokens must be >= 0")
        require(self.sample_tokens == 0 or self.sample_prompt != "",
                 "train.sample_prompt is empty; give the sample a prompt or set train.sample_tokens=0")


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    compute: ComputeConfig = ComputeConfig()
    psr: PSRConfig = PSRConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    data: DataConfig = DataConfig()
    mesh: MeshConfig = MeshConfig()
    train: TrainConfig = TrainConfig()

    def __post_init__(self):
        m, p = self.model, self.psr
        require(m.ffn == "moe" or p.schedule == "none",
                 "model.ffn=dense has no pool for PSR to grow; set psr.schedule=none")
        if p.schedule != "none":
            initial = reuse_lib.initial_pool(p.initial_experts, m.num_experts, m.pool_size)
            require(p.initial_experts <= m.pool_size,
                     f"psr.initial_experts={p.initial_experts} exceeds the pool size r*N={m.pool_size}")
            require(m.top_k <= initial,
                     f"model.top_k={m.top_k} exceeds psr.initial_experts={initial}: "
                     "top-K would have to pick masked experts")
            require(p.schedule != "stepwise" or p.stages <= m.pool_size - initial,
                     f"psr.stages={p.stages} exceeds the experts the pool grows by "
                     f"({m.pool_size - initial})")
        require(m.vocab_size >= 2, "model.vocab_size must be >= 2")
        require(not (self.data.document_masking and self.compute.attention == "flash"),
                "data.document_masking needs attention that masks by document, which the flash kernel "
                "does not; use compute.attention=auto or xla")
        require(self.data.batch_size % self.optim.grad_accum == 0,
                 f"data.batch_size={self.data.batch_size} is not divisible by optim.grad_accum="
                 f"{self.optim.grad_accum}")

    @property
    def tokens_per_step(self) -> int:
        return self.data.batch_size * self.data.seq_len

    @property
    def micro_batch_rows(self) -> int:
        """The sequences one micro-batch holds: the most a step (train or eval) computes at once."""
        return self.data.batch_size // self.optim.grad_accum

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

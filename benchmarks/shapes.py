"""The MoE shapes of the paper's models (16,384 tokens per device, top-K replicated), for the
benchmarks. `small` divides every dimension by 16 (tokens by 64) for a quick run on a CPU."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class MoEShape:
    name: str
    tokens: int
    top_k: int
    d: int
    f: int
    pool: int

    @property
    def rows(self) -> int:
        return self.tokens * self.top_k

    def shrink(self) -> MoEShape:
        return MoEShape(self.name + " (small)", self.tokens // 64, self.top_k, self.d // 16,
                        max(8, self.f // 16), max(4, self.pool // 16))


PAPER_SHAPES = (
    MoEShape("2.3B-R4", tokens=16384, top_k=8, d=512, f=744, pool=256),
    MoEShape("0.5B-R4", tokens=16384, top_k=4, d=768, f=384, pool=128),
    MoEShape("7B-R3", tokens=16384, top_k=6, d=2048, f=1408, pool=192),
)


def shapes(small: bool) -> tuple[MoEShape, ...]:
    return tuple(s.shrink() for s in PAPER_SHAPES) if small else PAPER_SHAPES

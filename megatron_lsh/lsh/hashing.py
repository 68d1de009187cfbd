"""Locality-sensitive hash families for grouping similar token vectors.

A family holds L independent hash functions over vectors of one size. Each function maps a
vector to one of ``num_buckets`` codes; the L codes read as the digits of one bucket id, so two
vectors share a bucket only if every function agrees (an AND of the functions).

Projections are drawn on the CPU from a seeded ``torch.Generator``: the same seed gives the
same functions on every rank and every device. Hashing runs in fp32 whatever the input dtype,
so identical tokens always land in the same bucket and bf16 and fp32 inputs hash alike.
"""

from __future__ import annotations

import hashlib
from typing import Dict

import torch

HASH_TYPES = ("cross_polytope", "spherical")

# Bucket ids are int64 and get an expert id mixed in above them (see clustering.py).
MAX_TOTAL_BUCKETS = 2**62


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any tuple of values, identical on every rank and run."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class LSHFamily:
    """L hash functions of one family. Subclasses say how projections become codes."""

    hash_type: str = ""

    def __init__(self, dim: int, num_hashes: int, num_buckets: int, seed: int):
        if num_hashes < 1:
            raise ValueError(f"num_hashes must be at least 1, got {num_hashes}")
        if num_buckets < 2:
            raise ValueError(f"num_buckets must be at least 2, got {num_buckets}")
        if num_buckets**num_hashes > MAX_TOTAL_BUCKETS:
            raise ValueError(
                f"{num_buckets} buckets per hash over {num_hashes} hashes gives "
                f"{num_buckets}**{num_hashes} bucket ids, more than int64 ids can hold; "
                "use fewer hashes or fewer buckets per hash"
            )
        self.dim = dim
        self.num_hashes = num_hashes
        self.num_buckets = num_buckets
        self.seed = seed
        self.total_buckets = num_buckets**num_hashes
        generator = torch.Generator().manual_seed(seed)
        directions = torch.randn(
            num_hashes, self.directions_per_hash, dim, generator=generator, dtype=torch.float32
        )
        # [dim, L * d]: one matmul projects a token onto every direction of every function.
        self._projection = self._prepare_directions(directions).reshape(-1, dim).T.contiguous()
        self._radix = num_buckets ** torch.arange(num_hashes, dtype=torch.int64)
        self._device_cache: Dict[torch.device, tuple] = {}

    @property
    def directions_per_hash(self) -> int:
        raise NotImplementedError

    def _prepare_directions(self, directions: torch.Tensor) -> torch.Tensor:
        return directions

    def _codes_from_projection(self, projected: torch.Tensor) -> torch.Tensor:
        """[N, L, d] projections -> [N, L] codes in [0, num_buckets)."""
        raise NotImplementedError

    def _on(self, device: torch.device):
        if device not in self._device_cache:
            self._device_cache[device] = (self._projection.to(device), self._radix.to(device))
        return self._device_cache[device]

    def codes(self, tokens: torch.Tensor) -> torch.Tensor:
        """[N, dim] tokens -> [N, L] int64 codes, one per hash function."""
        if tokens.dim() != 2 or tokens.size(1) != self.dim:
            raise ValueError(f"expected tokens of shape [N, {self.dim}], got {tuple(tokens.shape)}")
        projection, _ = self._on(tokens.device)
        with torch.no_grad():
            projected = tokens.detach().float() @ projection
            return self._codes_from_projection(
                projected.view(tokens.size(0), self.num_hashes, self.directions_per_hash)
            )

    def bucket_ids(self, tokens: torch.Tensor) -> torch.Tensor:
        """[N, dim] tokens -> [N] int64 bucket ids in [0, total_buckets)."""
        _, radix = self._on(tokens.device)
        return (self.codes(tokens) * radix).sum(dim=1)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(dim={self.dim}, num_hashes={self.num_hashes}, "
            f"num_buckets={self.num_buckets}, seed={self.seed})"
        )


class CrossPolytopeHash(LSHFamily):
    """Cross-polytope LSH (Andoni et al. 2015), Reformer-style.

    Each function projects onto b/2 random Gaussian directions and takes the largest-magnitude
    coordinate together with its sign: the argmax over [xR, -xR], b buckets.
    """

    hash_type = "cross_polytope"

    def __init__(self, dim: int, num_hashes: int, num_buckets: int, seed: int):
        if num_buckets % 2:
            raise ValueError(
                f"cross-polytope hashing has two buckets per direction, so num_buckets must be "
                f"even, got {num_buckets}"
            )
        super().__init__(dim, num_hashes, num_buckets, seed)

    @property
    def directions_per_hash(self) -> int:
        return self.num_buckets // 2

    def _codes_from_projection(self, projected: torch.Tensor) -> torch.Tensor:
        axis = projected.abs().argmax(dim=-1, keepdim=True)
        negative = projected.gather(-1, axis) < 0
        return (axis + negative.long() * self.directions_per_hash).squeeze(-1)


class SphericalHash(LSHFamily):
    """Spherical LSH: the nearest (largest cosine) of b random unit vectors, b buckets."""

    hash_type = "spherical"

    @property
    def directions_per_hash(self) -> int:
        return self.num_buckets

    def _prepare_directions(self, directions: torch.Tensor) -> torch.Tensor:
        # Unit vectors, so the argmax of dot products is the nearest vector on the sphere.
        return directions / directions.norm(dim=-1, keepdim=True)

    def _codes_from_projection(self, projected: torch.Tensor) -> torch.Tensor:
        return projected.argmax(dim=-1)


_FAMILIES = {cls.hash_type: cls for cls in (CrossPolytopeHash, SphericalHash)}
assert tuple(_FAMILIES) == HASH_TYPES


def build_hash_family(
    hash_type: str, dim: int, num_hashes: int, num_buckets: int, seed: int
) -> LSHFamily:
    """The hash family named ``hash_type`` ('cross_polytope' or 'spherical')."""
    if hash_type not in _FAMILIES:
        raise ValueError(f"unknown LSH hash type {hash_type!r}; choose one of {HASH_TYPES}")
    return _FAMILIES[hash_type](dim, num_hashes, num_buckets, seed)

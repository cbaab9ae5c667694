"""Platform-independent, seeded random streams.

Everything an adapter regenerates from its seed (Uni-LoRA's index draw, Fastfood's signs and
permutation, VeRA's frozen matrices) comes from here, so a saved adapter rebuilds the same
projection on any machine and any torch/numpy version. The generator is SplitMix64 evaluated
at counter positions: pure 64-bit integer arithmetic, no library RNG whose stream might change.
"""

from __future__ import annotations

import hashlib

import numpy as np

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix(z: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


class SeededStream:
    """An independent stream of random numbers named by (seed, name)."""

    def __init__(self, seed: int, name: str):
        digest = hashlib.sha256(f"unilora:{int(seed)}:{name}".encode()).digest()
        self._base = np.uint64(int.from_bytes(digest[:8], "little"))

    def uint64(self, n: int) -> np.ndarray:
        with np.errstate(over="ignore"):
            counters = self._base + np.arange(1, n + 1, dtype=np.uint64) * _GAMMA
        return _mix(counters)

    def uniform(self, n: int) -> np.ndarray:
        """Float64 in [0, 1); exact (53 random bits scaled by a power of two)."""
        return (self.uint64(n) >> np.uint64(11)).astype(np.float64) * (2.0**-53)

    def permutation(self, n: int) -> np.ndarray:
        return np.argsort(self.uint64(n), kind="stable")

    def signs(self, n: int) -> np.ndarray:
        return np.where(self.uint64(n) >> np.uint64(63), 1.0, -1.0)

    def normal(self, n: int) -> np.ndarray:
        """Box-Muller normals. log/cos may differ in the last ulp between platforms, so
        whatever depends on these is verified with a tolerance, never bit-for-bit."""
        u = self.uniform(2 * n)
        u1, u2 = 1.0 - u[:n], u[n:]
        return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)

"""Seeded Gaussian random projection g̃ = Pᵀ g (DESIGN.md step 1; the paper's d ≈ 400).

P is p × d with entries N(0, 1/d), so E[⟨Pᵀa, Pᵀb⟩] = ⟨a, b⟩ (Johnson–Lindenstrauss). P is never stored: its row block k (rows
k·block_rows … (k+1)·block_rows − 1) is generated from (seed, k) alone with numpy's counter-based
Philox generator and the integer-only ziggurat normal sampler, so every process, machine, CPU or
GPU gets the same bits. Blocks are cached up to ``cache_bytes`` and regenerated beyond that.
"""
from __future__ import annotations

import hashlib
import math
from collections import OrderedDict

import numpy as np
import torch


def _block_key(seed: int, block: int) -> int:
    digest = hashlib.sha256(f"ensemble-lora/projection/{seed}/{block}".encode()).digest()
    return int.from_bytes(digest[:16], "little")


class GaussianProjector:
    def __init__(self, p: int, d: int, seed: int = 0, block_rows: int = 32768,
                 cache_bytes: int = 1 << 30, device: str | torch.device = "cpu"):
        if d <= 0 or p <= 0:
            raise ValueError(f"projection dimensions must be positive (p={p}, d={d})")
        if d > p:
            raise ValueError(f"projection dimension d={d} is larger than the number of adapter "
                             f"parameters p={p}; choose d <= p")
        self.p, self.d, self.seed, self.block_rows = int(p), int(d), int(seed), int(block_rows)
        self.cache_bytes = int(cache_bytes)
        self.device = torch.device(device)
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()

    @property
    def n_blocks(self) -> int:
        return math.ceil(self.p / self.block_rows)

    def block(self, k: int) -> torch.Tensor:
        """Rows [k·block_rows, min(p, (k+1)·block_rows)) of P as a float32 tensor on device."""
        hit = self._cache.get(k)
        if hit is not None:
            self._cache.move_to_end(k)
            return hit
        rows = min(self.block_rows, self.p - k * self.block_rows)
        rng = np.random.Generator(np.random.Philox(key=_block_key(self.seed, k)))
        z = rng.standard_normal((rows, self.d), dtype=np.float32)
        z *= np.float32(1.0 / math.sqrt(self.d))
        t = torch.from_numpy(z).to(self.device)
        nbytes = t.numel() * 4
        if nbytes <= self.cache_bytes:
            self._cache[k] = t
            while sum(v.numel() * 4 for v in self._cache.values()) > self.cache_bytes:
                self._cache.popitem(last=False)
        return t

    def project(self, g: torch.Tensor) -> torch.Tensor:
        """g: [N, p] (any float dtype, any device) -> Pᵀg per row: [N, d] float32.

        Accumulated in float64 and rounded once: a float32 matmul's summation order depends on
        the BLAS library and its thread count, so its last bits would differ between machines
        and processes; the float64 sums of the same inputs round to the same float32 values."""
        if g.shape[-1] != self.p:
            raise ValueError(f"gradient has {g.shape[-1]} entries, projector expects p={self.p}")
        g = g.to(self.device, torch.float64)
        out = torch.zeros(g.shape[0], self.d, dtype=torch.float64, device=self.device)
        for k in range(self.n_blocks):
            a = k * self.block_rows
            out.addmm_(g[:, a:a + self.block_rows], self.block(k).double())
        return out.float()

    def expand(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """x: [d] or [N, d] -> P x: [p] or [N, p] (restores full adapter weights θ* + P x̂)."""
        x = torch.as_tensor(x, dtype=torch.float32, device=self.device)
        squeeze = x.ndim == 1
        x = x.reshape(-1, self.d)
        x = x.double()  # float64 sums, rounded once: identical on any BLAS (see project)
        parts = [x @ self.block(k).double().T for k in range(self.n_blocks)]
        out = torch.cat(parts, dim=1).float()
        return out[0] if squeeze else out

    def fingerprint(self) -> dict:
        """Enough to regenerate P anywhere, plus a checksum of its first block."""
        first = self.block(0)[:4].cpu().numpy().tobytes()
        return {"kind": "gaussian-philox", "p": self.p, "d": self.d, "seed": self.seed,
                "block_rows": self.block_rows,
                "check": hashlib.sha256(first).hexdigest()[:16]}

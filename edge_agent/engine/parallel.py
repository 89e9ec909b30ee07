"""`model.parallel = "auto"`: how many sequences to decode together, from the memory there is.

The rule (docs/architecture.md): each sequence has its own `n_ctx` window of KV cache, so N
sequences cost N x `kv_bytes_per_seq` on top of the weights. Of the memory available now
(`MemAvailable`), the model file and a fixed reserve are taken off; half of the rest may go to KV
cache (the other half stays for the OS, the store and the page cache); N is how many windows fit
in that half, at least 1 and at most `MAX_AUTO`. Pure: the caller reads the memory and the metadata.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MIB = 1024 * 1024
MAX_AUTO = 8  # the batched kernels gain little past 8 sequences on the CPUs this runs on (docs/performance.md)
RESERVE_BYTES = 256 * MIB  # the agent itself, compute buffers, the SQLite cache
KV_SHARE = 0.5  # of what is left after the weights and the reserve


@dataclass(frozen=True)
class ParallelChoice:
    n: int
    reason: str


def choose_parallel(kv_bytes_per_seq: int | None, model_bytes: int, available_bytes: int | None) -> ParallelChoice:
    """N for `model.parallel = "auto"`; 1 when the KV size or the available memory is unknown."""
    if kv_bytes_per_seq is None or kv_bytes_per_seq <= 0:
        return ParallelChoice(1, "auto: the model's metadata does not give its KV cache size; 1 sequence "
                                 "(set model.parallel to a number)")
    if available_bytes is None:
        return ParallelChoice(1, "auto: available memory unknown (no MemAvailable in /proc/meminfo); 1 sequence "
                                 "(set model.parallel to a number)")
    budget = int((available_bytes - model_bytes - RESERVE_BYTES) * KV_SHARE)
    fits = max(0, budget // kv_bytes_per_seq)
    n = max(1, min(MAX_AUTO, fits))
    facts = (f"{available_bytes // MIB} MiB available, model {model_bytes // MIB} MiB, {RESERVE_BYTES // MIB} MiB "
             f"reserve, {int(KV_SHARE * 100)}% of the rest for KV at {kv_bytes_per_seq / MIB:.1f} MiB per sequence")
    if fits == 0:
        return ParallelChoice(1, f"auto: not even one more KV window fits ({facts}); 1 sequence")
    cap = f" (capped at {MAX_AUTO})" if fits > MAX_AUTO else ""
    return ParallelChoice(n, f"auto: {n} sequences{cap}: {facts}")


def available_memory(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """`MemAvailable` in bytes, or None where the kernel does not report it."""
    try:
        text = meminfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None

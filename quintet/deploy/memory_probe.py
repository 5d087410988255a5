"""Resident memory of a loaded FP4 model, measured in a fresh process.

    resident_memory("runs/a-fp4", cache_tokens=2176)   # {"rss_first_copy", "rss_loaded", ...} in bytes
    python -m quintet.deploy.memory_probe FOLDER CACHE_TOKENS   # the same, printed as JSON

A process pays some memory once, whatever it loads: libraries loaded and code generated on first use
(PyTorch's, oneDNN's for each matmul shape, quintet's kernels). So the probe loads the model twice, each
copy run on a 16-token prompt and 8 decode steps, the first copy kept loaded (the second cannot reuse its
memory): `rss_loaded` is the second copy's cost, the model's own; `rss_first_copy` the first's, one-time
costs included; `rss_after_long_prompt` the second copy after a prompt filling its cache (the prompt's
activations, which the allocator keeps); `cache_bytes` the second copy's KV and Mamba cache. Linux
(/proc/self/status).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise OSError("/proc/self/status has no VmRSS line")


def _probe(folder: str, cache_tokens: int) -> dict[str, int]:
    import torch

    from quintet.deploy.quantized_folder import load_quantized

    torch.set_num_threads(1)

    def run(prompt: int):
        engine = load_quantized(folder, max_cache_length=cache_tokens)
        cache = engine.new_cache()
        with torch.inference_mode():
            engine(torch.randint(3, 1000, (1, prompt)), cache=cache, logits_to_keep=1)
            for _ in range(8):
                engine(torch.tensor([[5]]), cache=cache)
        return engine, cache

    start = _rss()
    first = run(16)
    once = _rss() - start
    base = _rss()
    engine, cache = run(16)
    loaded = _rss() - base
    with torch.inference_mode():
        long_prompt = torch.randint(3, 1000, (1, max(1, cache_tokens - 128)))
        engine(long_prompt, cache=engine.new_cache(), logits_to_keep=1)
    del first
    return {
        "rss_first_copy": once,
        "rss_loaded": loaded,
        "rss_after_long_prompt": _rss() - base,
        "cache_bytes": sum(cache.nbytes().values()),
    }


def resident_memory(
    folder: str | os.PathLike, cache_tokens: int = 512, timeout: float = 600
) -> dict[str, int]:
    """The probe above in a fresh process (one thread); raises RuntimeError with its stderr if it fails."""
    done = subprocess.run(
        [sys.executable, "-m", "quintet.deploy.memory_probe", str(Path(folder)), str(cache_tokens)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    if done.returncode:
        raise RuntimeError(f"the memory probe of {folder} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(_probe(sys.argv[1], int(sys.argv[2]))))

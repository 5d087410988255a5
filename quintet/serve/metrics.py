"""The server's counters, gauges and histograms, written as Prometheus text (`GET /metrics`)."""

from __future__ import annotations

import threading

HELP = {
    "quintet_serve_requests_total": ("counter", "HTTP requests answered, by endpoint and status code"),
    "quintet_serve_prompt_tokens_total": ("counter", "prompt tokens of admitted requests"),
    "quintet_serve_prefill_tokens_total": ("counter", "prompt tokens run through the model (not reused)"),
    "quintet_serve_generation_tokens_total": ("counter", "tokens generated"),
    "quintet_serve_prefix_cache_hits_total": ("counter", "requests that resumed from a stored prefix"),
    "quintet_serve_prefix_cache_misses_total": ("counter", "requests that found no stored prefix"),
    "quintet_serve_prefix_cache_hit_tokens_total": ("counter", "prompt tokens reused from stored prefixes"),
    "quintet_serve_prefix_cache_bytes": ("gauge", "bytes of stored prefix snapshots"),
    "quintet_serve_prefix_cache_entries": ("gauge", "stored prefix snapshots"),
    "quintet_serve_queue_length": ("gauge", "requests waiting for a slot"),
    "quintet_serve_running_sequences": ("gauge", "sequences in the decode batch"),
    "quintet_serve_slots_in_use": ("gauge", "cache slots held (running + prefilling)"),
    "quintet_serve_max_batch": ("gauge", "cache slots (--max-batch)"),
    "quintet_serve_time_to_first_token_seconds": ("histogram", "from arrival to the first token"),
    "quintet_serve_batch_size": ("histogram", "sequences per decode step (batch occupancy)"),
}
BUCKETS = {
    "quintet_serve_time_to_first_token_seconds": (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    "quintet_serve_batch_size": (1, 2, 4, 8, 16, 32, 64),
}


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


class Metrics:
    """Thread-safe; names and kinds in `HELP`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[tuple[str, str], float] = {}
        self._hist: dict[str, list[float]] = {}  # bucket counts..., sum, count

    def inc(self, name: str, amount: float = 1, **labels: str) -> None:
        key = (name, _labels(labels))
        with self._lock:
            self._values[key] = self._values.get(key, 0) + amount

    def set_gauge(self, name: str, value: float) -> None:
        with self._lock:
            self._values[(name, "")] = value

    def observe(self, name: str, value: float) -> None:
        buckets = BUCKETS[name]
        with self._lock:
            h = self._hist.setdefault(name, [0.0] * (len(buckets) + 2))
            for i, edge in enumerate(buckets):
                if value <= edge:
                    h[i] += 1
            h[-2] += value
            h[-1] += 1

    def get(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._values.get((name, _labels(labels)), 0)

    def render(self) -> str:
        lines = []
        with self._lock:
            for name, (kind, text) in HELP.items():
                lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
                if kind == "histogram":
                    h = self._hist.get(name, [0.0] * (len(BUCKETS[name]) + 2))
                    for edge, count in zip(BUCKETS[name], h, strict=False):
                        lines.append(f'{name}_bucket{{le="{edge}"}} {count:g}')
                    lines += [f'{name}_bucket{{le="+Inf"}} {h[-1]:g}', f"{name}_sum {h[-2]:g}"]
                    lines.append(f"{name}_count {h[-1]:g}")
                    continue
                rows = [(lab, v) for (n, lab), v in self._values.items() if n == name]
                for lab, v in sorted(rows) or [("", 0)]:
                    lines.append(f"{name}{lab} {v:g}")
        return "\n".join(lines) + "\n"

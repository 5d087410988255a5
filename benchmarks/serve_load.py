"""A bounded load against `quintet serve` and against llama.cpp's OpenAI server, on the same weights.

    python benchmarks/serve_load.py [--preset jamba-small] [--requests 64] [--concurrency 1 4 8]
                                    [--max-tokens 32] [--threads 2] [--out runs/benchmarks/serve_load.json]

The model is --preset with seed-0 weights (or --model-dir, a float Jamba folder), quantized to M0E4 (group
32) for quintet and exported from that FP4 folder to GGUF Q4_0 (`quintet deploy export-gguf`) for
llama.cpp, so both serve the same 4-bit weights. llama.cpp's server is llama-cpp-python's
`llama_cpp.server` (the `bench` extra); without it only quintet runs, and the table says so.

Both servers run on 127.0.0.1 with --threads threads each, one at a time: for each concurrency the
systems are interleaved (anchor, ours), each running --requests streamed completions of mixed prompt
lengths (16..512 tokens), --max-tokens tokens each (ignore_eos), temperature 0. Reported per run:
aggregate output tokens/s (tokens / wall time), p50 / p95 time to first token, p50 / p95 inter-token
latency, errors. Then the shared-prefix variant on quintet: chat requests that share a 400-token system
prompt, time to first token on a prefix-cache miss (`cache_prompt: false`) against a hit, interleaved.
The load average is printed before and after. Stops by itself; the servers are stopped on exit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quintet.serve.launch import _stop, free_port, running_server  # noqa: E402

WORDS = "the model reads every token once and keeps a small state for each sequence it serves".split()


def text_of(n_words: int, rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


@contextlib.contextmanager
def llama_server(gguf: Path, threads: int, ctx: int):
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(gguf),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_threads",
        str(threads),
        "--n_ctx",
        str(ctx),
        "--model_alias",
        "anchor",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited with {proc.returncode}")
            with contextlib.suppress(OSError), urllib.request.urlopen(url + "/v1/models", timeout=2):
                break
            if time.monotonic() > deadline:
                raise TimeoutError("llama_cpp.server did not start")
            time.sleep(0.2)
        yield url
    finally:
        _stop(proc, 10)


def one_request(url: str, body: dict, path: str = "/v1/completions") -> dict:
    """One streamed request: time to first token, the gaps between tokens, tokens received."""
    start = time.perf_counter()
    stamps = []
    with httpx.Client(timeout=600) as http, http.stream("POST", url + path, json=body) as r:
        if r.status_code != 200:
            r.read()
            return {"error": f"{r.status_code} {r.text[:200]}"}
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            choices = chunk.get("choices") or []
            if choices and (choices[0].get("text") or (choices[0].get("delta") or {}).get("content")):
                stamps.append(time.perf_counter())
    if not stamps:
        return {"error": "no tokens"}
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return {"ttft": stamps[0] - start, "gaps": gaps, "tokens": len(stamps), "end": stamps[-1]}


def run_load(
    url: str, model: str, prompts: list[str], concurrency: int, max_tokens: int, extra: dict
) -> dict:
    results: list[dict] = [None] * len(prompts)
    queue = list(range(len(prompts)))
    lock = threading.Lock()

    def worker():
        while True:
            with lock:
                if not queue:
                    return
                i = queue.pop(0)
            body = {
                "model": model,
                "prompt": prompts[i],
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": True,
                **extra,
            }
            results[i] = one_request(url, body)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ok = [r for r in results if "error" not in r]
    ttft = sorted(r["ttft"] for r in ok)
    gaps = sorted(g for r in ok for g in r["gaps"])

    def pct(xs, p):
        return xs[min(len(xs) - 1, int(p * len(xs)))] if xs else float("nan")

    return {
        "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
        "ttft_p50": pct(ttft, 0.5),
        "ttft_p95": pct(ttft, 0.95),
        "itl_p50": pct(gaps, 0.5),
        "itl_p95": pct(gaps, 0.95),
        "errors": len(results) - len(ok),
        "wall_s": wall,
    }


def prefix_variant(url: str, model: str, rounds: int, rng: random.Random) -> dict:
    system = text_of(78, rng)  # about 400 tokens of the byte-level tokenizer (the count is printed)
    miss, hit, cached = [], [], []
    one_request(
        url,
        {
            "model": model,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": "warm"}],
            "max_tokens": 2,
            "stream": True,
        },
        "/v1/chat/completions",
    )
    for i in range(rounds):
        for use_cache, sink in ((False, miss), (True, hit)):
            messages = [
                {"role": "system", "content": system},
                {"role": "user", "content": f"question {i} {use_cache}"},
            ]
            body = {
                "model": model,
                "messages": messages,
                "max_tokens": 4,
                "temperature": 0,
                "stream": True,
                "cache_prompt": use_cache,
                "stream_options": {"include_usage": True},
            }
            sink.append(one_request(url, body, "/v1/chat/completions")["ttft"])
    out = httpx.post(
        url + "/v1/chat/completions",
        json={
            "model": model,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": "count"}],
            "max_tokens": 1,
        },
    ).json()
    cached = out["usage"]["prompt_tokens_details"]["cached_tokens"]
    return {
        "prompt_tokens": out["usage"]["prompt_tokens"],
        "cached_tokens": cached,
        "ttft_miss_p50": statistics.median(miss),
        "ttft_hit_p50": statistics.median(hit),
        "ratio": statistics.median(miss) / statistics.median(hit),
    }


def prepare(args) -> tuple[Path, Path | None]:
    from quintet.deploy.convert import quantize_folder
    from quintet.deploy.gguf_export import export_gguf
    from quintet.models.jamba.create import create_model

    work = Path(args.work)
    float_dir = Path(args.model_dir) if args.model_dir else work / f"{args.preset}-float"
    if not args.model_dir and not (float_dir / "config.json").is_file():
        create_model(args.preset, float_dir, seed=0)
    fp4 = work / f"{float_dir.name}-fp4"
    if not (fp4 / "config.json").is_file():
        quantize_folder(float_dir, fp4, group_size=32)
    gguf = None
    try:
        import llama_cpp.server  # noqa: F401

        gguf = work / f"{float_dir.name}-q4_0.gguf"
        if not gguf.is_file():
            export_gguf(fp4, gguf, type="q4_0")
    except ImportError:
        print("llama-cpp-python[server] not installed (the `bench` extra): quintet only", file=sys.stderr)
    return fp4, gguf


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="jamba-small")
    p.add_argument("--model-dir", help="a float Jamba folder instead of --preset")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prefix-rounds", type=int, default=8)
    p.add_argument("--work", default="runs/benchmarks/serve_load")
    p.add_argument("--out", default="runs/benchmarks/serve_load.json")
    args = p.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    fp4, gguf = prepare(args)
    rng = random.Random(0)
    prompts = [text_of(rng.choice([4, 16, 40, 100]), rng) for _ in range(args.requests)]
    load_before = os.getloadavg()
    print(f"threads per server: {args.threads}; load average before: {load_before[0]:.2f}", flush=True)
    rows = []
    stack = contextlib.ExitStack()
    with stack:
        ours = stack.enter_context(
            running_server(
                fp4,
                "--threads",
                str(args.threads),
                "--max-batch",
                "8",
                "--max-context",
                "2048",
                "--log-level",
                "warning",
            )
        )
        anchor = stack.enter_context(llama_server(gguf, args.threads, 2048)) if gguf else None
        systems = ([("llama.cpp server Q4_0", anchor, "anchor", {})] if anchor else []) + [
            ("quintet serve FP4", ours, fp4.name, {"ignore_eos": True, "cache_prompt": False})
        ]
        for c in args.concurrency:
            for name, url, model, extra in systems:
                r = run_load(url, model, prompts, c, args.max_tokens, extra)
                rows.append({"system": name, "concurrency": c, **r})
                print(
                    f"{name:24s} c={c}: {r['tokens_per_s']:7.1f} tok/s  "
                    f"TTFT p50 {r['ttft_p50'] * 1e3:6.0f} ms "
                    f"p95 {r['ttft_p95'] * 1e3:6.0f} ms  ITL p50 {r['itl_p50'] * 1e3:5.1f} ms "
                    f"p95 {r['itl_p95'] * 1e3:5.1f} ms  errors {r['errors']}",
                    flush=True,
                )
        prefix = prefix_variant(ours, fp4.name, args.prefix_rounds, rng)
    print(
        f"shared system prompt ({prefix['prompt_tokens']} prompt tokens, "
        f"{prefix['cached_tokens']} reused on a hit): TTFT p50 miss {prefix['ttft_miss_p50'] * 1e3:.0f} ms, "
        f"hit {prefix['ttft_hit_p50'] * 1e3:.0f} ms: "
        f"{prefix['ratio']:.1f}x"
    )
    for c in args.concurrency:
        by = {r["system"]: r for r in rows if r["concurrency"] == c}
        if len(by) == 2:
            a, o = by["llama.cpp server Q4_0"], by["quintet serve FP4"]
            print(
                f"c={c}: quintet / llama.cpp aggregate tokens/s = "
                f"{o['tokens_per_s'] / a['tokens_per_s']:.2f}x"
            )
    load_after = os.getloadavg()
    print(f"load average after: {load_after[0]:.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {
                "threads": args.threads,
                "requests": args.requests,
                "max_tokens": args.max_tokens,
                "load": [load_before[0], load_after[0]],
                "rows": rows,
                "prefix": prefix,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A bounded load against `quintet serve` and against llama.cpp's OpenAI server, on the same weights.

    python benchmarks/serve_load.py [--preset jamba-small | --model-dir FLOAT | --fp4-dir FP4 [--gguf Q4_0]]
                                    [--requests 64] [--concurrency 1 4 8] [--repeats 1] [--max-tokens 32]
                                    [--threads 2] [--time-limit 3600] [--out runs/benchmarks/serve_load.json]

The model is --preset with seed-0 weights (or --model-dir, a float Jamba folder), quantized to M0E4 (group
32) for quintet and exported from that FP4 folder to GGUF Q4_0 (`quintet deploy export-gguf`) for
llama.cpp, so both serve the same 4-bit weights; --fp4-dir / --gguf use folders made before instead.
llama.cpp's server is llama-cpp-python's `llama_cpp.server` (the `bench` extra); without it only quintet
runs, and the table says so.

Both servers run on 127.0.0.1 with --threads threads each (llama.cpp: --n_threads and --n_threads_batch;
quintet: torch's threads), side by side but loaded one at a time: for each concurrency and repeat the
systems are interleaved (anchor, ours), each running --requests streamed completions of mixed prompt
lengths (the same prompts for both; the tokenizer is byte-level, 20 to 500 tokens), temperature 0 and
exactly --max-tokens tokens each (quintet: `ignore_eos`; llama.cpp: `min_tokens`). Tokens are counted
from the servers' `usage`. Reported per concurrency, the median over --repeats runs of: aggregate output
tokens/s (tokens / wall time), p50 / p95 time to first token, p50 / p95 inter-token latency, errors,
short answers (fewer than --max-tokens tokens) and the 1-minute load average after the run.
Then the shared-prefix variant on quintet: chat requests that share a 400-token system prompt, time to
first token on a prefix-cache miss (`cache_prompt: false`) against a hit, interleaved, medians.

The load average is printed before and after. Bounded: past --time-limit seconds the remaining runs are
skipped (the table says which ran); the servers are stopped on exit, whatever happens.
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
        "--n_threads_batch",
        str(threads),
        "--n_ctx",
        str(ctx),
        "--model_alias",
        "anchor",
        # llama-cpp-python's server runs one request at a time; by default a new request cuts off the one
        # that is streaming (its stream just ends), which would count as fewer tokens, not as load: queue
        "--interrupt_requests",
        "False",
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
    stamps, usage = [], None
    # the client is made before the clock starts: making one (httpx loads an SSL context) took ~30 ms
    # here, the same for both servers, and no part of the server's time to first token
    with httpx.Client(timeout=600) as http:
        start = time.perf_counter()
        with http.stream("POST", url + path, json=body) as r:
            if r.status_code != 200:
                r.read()
                return {"error": f"{r.status_code} {r.text[:200]}"}
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {"error": str(chunk["error"])[:200]}
                usage = chunk.get("usage") or usage
                choices = chunk.get("choices") or []
                # A chunk that carries a piece of the answer: llama.cpp's server sends one per token (its text
                # may be empty), quintet one per token whose bytes complete a character. Neither the chat's
                # opening role chunk nor the closing finish_reason chunk counts.
                if (
                    choices
                    and choices[0].get("finish_reason") is None
                    and "role" not in (choices[0].get("delta") or {})
                ):
                    stamps.append(time.perf_counter())
    if not stamps:
        return {"error": "no tokens"}
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    tokens = usage["completion_tokens"] if usage else len(stamps)  # the server's count where it sends one
    return {"ttft": stamps[0] - start, "gaps": gaps, "tokens": tokens, "end": stamps[-1]}


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
    short = sum(r["tokens"] < max_tokens for r in ok)  # both servers are asked for exactly max_tokens
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
        "short": short,
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
        import llama_cpp.server.app  # noqa: F401  (its FastAPI app: the [server] extra)

        gguf = work / f"{float_dir.name}-q4_0.gguf"
        if not gguf.is_file():
            export_gguf(fp4, gguf, type="q4_0")
    except ImportError:
        print("llama-cpp-python[server] not installed (the `bench` extra): quintet only", file=sys.stderr)
    return fp4, gguf


def given(args) -> tuple[Path, Path | None]:
    """--fp4-dir / --gguf: folders made before (checked, not rebuilt)."""
    fp4 = Path(args.fp4_dir)
    if not (fp4 / "config.json").is_file():
        raise SystemExit(f"--fp4-dir {fp4}: no config.json there (an FP4 folder from `quintet deploy`)")
    gguf = Path(args.gguf) if args.gguf else None
    if gguf is not None and not gguf.is_file():
        raise SystemExit(f"--gguf {gguf}: no such file")
    if gguf is not None:
        try:
            import llama_cpp.server.app  # noqa: F401  (its FastAPI app: the [server] extra)
        except ImportError:
            raise SystemExit(
                "--gguf given but llama-cpp-python[server] is not installed (the `bench` extra)"
            ) from None
    return fp4, gguf


def median_row(runs: list[dict]) -> dict:
    """Per field, the median over the repeats (errors: the sum)."""
    out = {k: statistics.median(r[k] for r in runs) for k in runs[0] if k not in ("errors", "short")}
    out["errors"] = sum(r["errors"] for r in runs)
    out["short"] = sum(r["short"] for r in runs)
    out["repeats"] = len(runs)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="jamba-small")
    p.add_argument("--model-dir", help="a float Jamba folder instead of --preset")
    p.add_argument("--fp4-dir", help="an FP4 folder made before (skips creating and quantizing)")
    p.add_argument("--gguf", help="with --fp4-dir: the Q4_0 GGUF exported from it, for llama.cpp")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--repeats", type=int, default=1, help="runs per system and concurrency (medians)")
    p.add_argument("--time-limit", type=float, default=3600, help="seconds; later runs are skipped")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prefix-rounds", type=int, default=8)
    p.add_argument("--work", default="runs/benchmarks/serve_load")
    p.add_argument("--out", default="runs/benchmarks/serve_load.json")
    args = p.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    if args.gguf and not args.fp4_dir:
        raise SystemExit("--gguf needs --fp4-dir (the FP4 folder it was exported from)")
    fp4, gguf = given(args) if args.fp4_dir else prepare(args)
    deadline = time.monotonic() + args.time_limit
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
        systems = (
            [("llama.cpp server Q4_0", anchor, "anchor", {"min_tokens": args.max_tokens})] if anchor else []
        ) + [
            (
                "quintet serve FP4",
                ours,
                fp4.name,
                {"ignore_eos": True, "cache_prompt": False, "stream_options": {"include_usage": True}},
            )
        ]
        for _name, url, model, extra in systems:  # the first request of a process pays one-time costs
            run_load(url, model, prompts[:2], 1, 4, extra)
        runs: dict[tuple[str, int], list[dict]] = {}
        for c in args.concurrency:
            for rep in range(args.repeats):
                for name, url, model, extra in systems:
                    if time.monotonic() > deadline:
                        print(f"--time-limit reached: {name} c={c} repeat {rep + 1} skipped", flush=True)
                        continue
                    r = run_load(url, model, prompts, c, args.max_tokens, extra)
                    r["load1"] = os.getloadavg()[0]  # the machine's 1-minute load average after the run
                    runs.setdefault((name, c), []).append(r)
                    print(
                        f"{name:24s} c={c} run {rep + 1}: {r['tokens_per_s']:7.1f} tok/s  "
                        f"TTFT p50 {r['ttft_p50'] * 1e3:6.0f} ms "
                        f"p95 {r['ttft_p95'] * 1e3:6.0f} ms  ITL p50 {r['itl_p50'] * 1e3:5.1f} ms "
                        f"p95 {r['itl_p95'] * 1e3:5.1f} ms  errors {r['errors']}  short {r['short']}  "
                        f"load {r['load1']:.2f}",
                        flush=True,
                    )
        rows = [{"system": name, "concurrency": c, **median_row(rs)} for (name, c), rs in runs.items()]
        prefix = prefix_variant(ours, fp4.name, args.prefix_rounds, rng)
    print(
        f"shared system prompt ({prefix['prompt_tokens']} prompt tokens, "
        f"{prefix['cached_tokens']} reused on a hit): TTFT p50 miss {prefix['ttft_miss_p50'] * 1e3:.0f} ms, "
        f"hit {prefix['ttft_hit_p50'] * 1e3:.0f} ms: "
        f"{prefix['ratio']:.1f}x"
    )
    print("\nmedians over the repeats:")
    print(
        "| system | concurrency | runs | tokens/s | TTFT p50 ms | TTFT p95 ms | ITL p50 ms | ITL p95 ms "
        "| errors | short |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['system']} | {r['concurrency']} | {r['repeats']} | {r['tokens_per_s']:.1f} | "
            f"{r['ttft_p50'] * 1e3:.0f} | {r['ttft_p95'] * 1e3:.0f} | {r['itl_p50'] * 1e3:.1f} | "
            f"{r['itl_p95'] * 1e3:.1f} | {r['errors']} | {r['short']} |"
        )
    for c in args.concurrency:
        by = {r["system"]: r for r in rows if r["concurrency"] == c}
        if len(by) == 2 and by["llama.cpp server Q4_0"]["tokens_per_s"] > 0:
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
                "repeats": args.repeats,
                "max_tokens": args.max_tokens,
                "command": " ".join(sys.argv),
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

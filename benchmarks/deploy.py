"""The FP4 deployment engine against transformers and quintet's float model: speed, file size, quality.

    python benchmarks/deploy.py speed   [--threads 1] [--runs 3] [--models jamba-small] [--prompt 512]
                                        [--new-tokens 64] [--out runs/benchmarks/deploy_speed.json]
    python benchmarks/deploy.py quality [--threads 1] [--train-steps 600] [--quality-model DIR]
                                        [--out runs/benchmarks/deploy_quality.json]

speed, per model (the same seed-0 weights for all, one process):
- transformers fp32: `transformers.JambaForCausalLM` in float32, its `generate`;
- quintet fp32: `JambaForCausalLM` in float32, `quintet.generation.generate`;
- engine bf16: `to_engine(dtype=bfloat16)` (sub-tensor KV cache, fusions), unquantized;
- engine FP4: the model quantized to M0E4 (group 64, round to nearest) and loaded with `load_quantized`.
Prefill: tokens/s of one --prompt-token prompt into an empty cache (last-token logits). Decode: tokens/s of
the decode steps of --new-tokens greedy tokens after that prompt, timed inside each system's own generation
loop (transformers' `generate` with a streamer noting each token's arrival; quintet's `stream_generate`),
from the first new token to the last.
Files: bytes of each folder's safetensors (float32, bfloat16 copy, FP4). Medians of --runs, the systems
interleaved within each run (after one warm-up each), so that a drift in the machine's load hits all.

quality: held-out perplexity of a model in float32 and in FP4 (round to nearest and GPTQ, groups of 32,
64, 128): "perplexity" with the dequantized weights in float32 (the quantization alone), "engine
perplexity" through the engine (FP4: quintet's M0E4 kernels, float32 activations; the float32 row: the
float32 engine), and "layer error", the mean over quantized Linears of ||X W^T - X Q^T|| / ||X W^T|| on
held-out inputs X.
The model is --quality-model if given, else a Jamba (jamba-tiny's shape, byte vocabulary) trained here for
--train-steps on Python standard-library modules (files shipped with Python; every 10th module held out
for evaluation, the others for training and GPTQ calibration); the trained model is kept in --work.
Every perplexity is `quintet eval perplexity`'s computation (`quintet.eval.perplexity`, rolling windows of
--seq-len per document) on --work/held-out.jsonl: the FP4 rows' engine figure and the float32 row's
perplexity are that command run on the folders, so `quintet eval perplexity --model FOLDER --data
runs/benchmarks/deploy_quality/held-out.jsonl --max-length 256` reproduces them.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import markdown_table, set_threads, write_results  # noqa: E402

from quintet.deploy.convert import quantize_folder  # noqa: E402
from quintet.deploy.engine import to_engine
from quintet.deploy.qlinear import M0E4Linear  # noqa: E402
from quintet.deploy.quantized_folder import (
    file_bytes,  # noqa: E402
    load_dequantized,
    load_quantized,
    load_quantized_model,
)
from quintet.eval.perplexity import evaluate_perplexity, perplexity_by_language  # noqa: E402
from quintet.generation import prefill, stream_generate  # noqa: E402
from quintet.kernels.m0e4_cpu import int8_activations_available  # noqa: E402
from quintet.models.jamba import JambaConfig, JambaForCausalLM  # noqa: E402
from quintet.tokenizer import ByteTokenizer, load_tokenizer  # noqa: E402


# ---------------------------------------------------------------------------------------------- speed
def _systems(folder: Path, fp4: Path) -> dict[str, object]:
    import transformers

    return {
        "transformers fp32": transformers.JambaForCausalLM.from_pretrained(
            folder, dtype=torch.float32
        ).eval(),
        "quintet fp32": JambaForCausalLM.from_pretrained(folder),
        "engine bf16": to_engine(JambaForCausalLM.from_pretrained(folder), dtype=torch.bfloat16),
        "engine FP4": load_quantized(fp4),
    }


def _prefill_fn(name: str, model, ids: torch.Tensor):
    if name.startswith("transformers"):
        return lambda: model(ids, use_cache=True, logits_to_keep=1).logits
    return lambda: prefill(model, ids, None, model.new_cache())


class _Stamps:
    """A transformers streamer that only notes when each piece arrives (the prompt first, then tokens)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.tokens: list[int] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())
        if len(self.times) > 1:
            self.tokens.extend(value.reshape(-1).tolist())

    def end(self) -> None:
        pass


def _decode_run(name: str, model, ids: torch.Tensor, k: int) -> tuple[float, list[int]]:
    """Seconds from the first new token to the k-th inside the system's own generation loop, and tokens."""
    if name.startswith("transformers"):
        stamps = _Stamps()
        model.generate(
            ids, max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=0, streamer=stamps
        )
        return stamps.times[-1] - stamps.times[1], stamps.tokens
    times, tokens = [], []
    for step in stream_generate(model, ids.tolist(), max_new_tokens=k, stop_token_ids=()):
        times.append(time.perf_counter())
        tokens.append(step[0])
    return times[-1] - times[0], tokens


def speed(args: argparse.Namespace) -> None:
    rows = []
    for spec in args.models.split(","):
        preset, _, over = spec.partition(":")
        overrides = {k: int(v) for k, v in (kv.split("=") for kv in over.split(";") if kv)}
        config = JambaConfig.from_preset(preset, **overrides)
        with tempfile.TemporaryDirectory() as tmp:
            folder, bf16, fp4 = Path(tmp) / "fp32", Path(tmp) / "bf16", Path(tmp) / "fp4"
            torch.manual_seed(0)
            model = JambaForCausalLM(config)
            model.save_pretrained(folder)
            model.to(torch.bfloat16).save_pretrained(bf16)
            del model
            quantize_folder(folder, fp4, group_size=64)
            files = {"fp32": file_bytes(folder), "bf16": file_bytes(bf16), "fp4": file_bytes(fp4)}
            systems = _systems(folder, fp4)
            ids = torch.randint(
                3, config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(1)
            )
            k = args.new_tokens
            tokens = {}
            pre_times: dict[str, list[float]] = {name: [] for name in systems}
            dec_times: dict[str, list[float]] = {name: [] for name in systems}
            with torch.inference_mode():
                for name, m in systems.items():  # warm-up
                    _prefill_fn(name, m, ids)()
                    tokens[name] = _decode_run(name, m, ids, k)[1]
                for _ in range(args.runs):  # systems interleaved in every run: load drifts hit all alike
                    for name, m in systems.items():
                        start = time.perf_counter()
                        _prefill_fn(name, m, ids)()
                        pre_times[name].append(time.perf_counter() - start)
                        dec_times[name].append(_decode_run(name, m, ids, k)[0])
            for name in systems:
                file = files["fp4"] if "FP4" in name else files["fp32"]
                rows.append(
                    {
                        "model": spec,
                        "system": name,
                        "prefill tok/s": args.prompt / statistics.median(pre_times[name]),
                        "decode tok/s": (k - 1) / statistics.median(dec_times[name]),
                        "file MiB": file / 2**20,
                    }
                )
                print(f"  {spec} {name}: {rows[-1]}", file=sys.stderr, flush=True)
            base = next(r for r in rows if r["model"] == spec and r["system"] == "transformers fp32")
            bf16_row = next(r for r in rows if r["model"] == spec and r["system"] == "engine bf16")
            for r in rows:
                if r["model"] == spec:
                    r["decode / transformers"] = r["decode tok/s"] / base["decode tok/s"]
                    r["prefill / engine bf16"] = r["prefill tok/s"] / bf16_row["prefill tok/s"]
            ref = tokens["quintet fp32"]
            agree = {n: sum(a == b for a, b in zip(t, ref, strict=False)) for n, t in tokens.items()}
            print(
                f"{spec}: files fp32 {files['fp32'] / 2**20:.1f} MiB, bf16 {files['bf16'] / 2**20:.1f} MiB, "
                f"FP4 {files['fp4'] / 2**20:.1f} MiB: FP4 / bf16 = {files['fp4'] / files['bf16']:.3f}; "
                f"greedy tokens equal to quintet fp32's (of {k}): {agree}"
            )
            rows.append(
                {
                    "model": spec,
                    "system": "files",
                    "fp32 MiB": files["fp32"] / 2**20,
                    "bf16 MiB": files["bf16"] / 2**20,
                    "fp4 MiB": files["fp4"] / 2**20,
                    "fp4 / bf16": files["fp4"] / files["bf16"],
                    "greedy agreement": agree,
                }
            )
    table = [r for r in rows if r["system"] != "files"]
    print(
        f"threads={args.threads}, prompt {args.prompt} tokens, {args.new_tokens} new tokens, "
        f"median of {args.runs}, batch 1"
    )
    print(
        markdown_table(
            table,
            [
                "model",
                "system",
                "prefill tok/s",
                "decode tok/s",
                "file MiB",
                "decode / transformers",
                "prefill / engine bf16",
            ],
        )
    )
    write_results(
        args.out,
        "deploy_speed",
        rows,
        threads=args.threads,
        runs=args.runs,
        prompt=args.prompt,
        new_tokens=args.new_tokens,
    )


# ---------------------------------------------------------------------------------------------- quality
def _stdlib_texts() -> tuple[list[str], list[str]]:
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    held_out = [t for i, t in enumerate(texts) if i % 10 == 0]
    train = [t for i, t in enumerate(texts) if i % 10 != 0]
    return train, held_out


def _train_quality_model(folder: Path, train: list[str], steps: int, seq_len: int, batch: int) -> None:
    tok = ByteTokenizer()
    ids = torch.tensor([t for text in train for t in tok.encode(text) + [tok.eos_token_id]])
    config = JambaConfig.from_preset("jamba-tiny", vocab_size=tok.vocab_size + 1)
    torch.manual_seed(0)
    model = JambaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for step in range(steps):
        offsets = torch.randint(0, ids.numel() - seq_len, (batch,), generator=gen)
        x = torch.stack([ids[o : o + seq_len] for o in offsets])
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            print(
                f"  train step {step}: loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
    model.eval().save_pretrained(folder)


@torch.inference_mode()
def _linear_inputs(model: JambaForCausalLM, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The inputs every Linear of the float model sees on `ids` (rows of the held-out text)."""
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [
        m.register_forward_hook(
            lambda mod, a, o, n=n: seen.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1]))
        )
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
    ]
    model(ids)
    for h in hooks:
        h.remove()
    return {n: torch.cat(x) for n, x in seen.items()}


@torch.inference_mode()
def _layer_error(float_model: JambaForCausalLM, fp4_dir: Path, inputs: dict[str, torch.Tensor]) -> float:
    """Mean over quantized Linears of ||X W^T - X Q^T|| / ||X W^T|| on held-out inputs X."""
    quantized = load_quantized_model(fp4_dir)
    errors = []
    for name, x in inputs.items():
        module = quantized.get_submodule(name)
        if isinstance(module, M0E4Linear):
            ref = x @ float_model.get_submodule(name).weight.t()
            errors.append(float((x @ module.dequantized_weight().t() - ref).norm() / ref.norm()))
    return sum(errors) / len(errors)


def _decode_perplexity(engine, docs: list[list[int]], seq_len: int, budget: int) -> float:
    """Perplexity of held-out tokens predicted one decode step at a time: each window of `seq_len` tokens
    of each document starts from its first token, and every next token comes from a one-token step (the
    engine's decode path, the one int8 activations change; `quintet eval perplexity` runs whole windows
    through prefill). Stops after `budget` predicted tokens."""
    nll, n = 0.0, 0
    with torch.inference_mode():
        for ids in docs:
            for start in range(0, len(ids) - 1, seq_len):
                window = ids[start : start + seq_len]
                cache = engine.new_cache()
                logits = engine(torch.tensor([window[:1]]), cache=cache, logits_to_keep=1).logits
                for t in range(1, len(window)):
                    if n >= budget:
                        return math.exp(nll / n)
                    nll -= torch.log_softmax(logits[0, -1].float(), -1)[window[t]].item()
                    n += 1
                    logits = engine(torch.tensor([[window[t]]]), cache=cache).logits
    return math.exp(nll / max(n, 1))


def quality(args: argparse.Namespace) -> None:
    train, held_out = _stdlib_texts()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.quality_model:
        folder = Path(args.quality_model)
    else:
        folder = work / f"model-{args.train_steps}"
        if not (folder / "config.json").is_file():
            _train_quality_model(folder, train, args.train_steps, args.seq_len, args.batch)
    tok = load_tokenizer(folder, vocab_size=JambaConfig.from_pretrained(folder).vocab_size)
    eval_ids = torch.tensor([t for text in held_out for t in tok.encode(text)][: args.eval_tokens])
    # The held-out texts, cut to --eval-tokens, as a file `quintet eval perplexity` reads: every
    # perplexity below is that command's computation (rolling windows of --seq-len per document).
    texts, budget = [], args.eval_tokens
    for text in held_out:
        n = len(tok.encode(text))
        texts.append(text if n <= budget else tok.decode(tok.encode(text)[:budget]))
        budget -= min(n, budget)
        if budget == 0:
            break
    held_file = work / "held-out.jsonl"
    held_file.write_text("".join(json.dumps({"text": t, "lang": "code"}) + "\n" for t in texts))

    def ppl_of(model) -> float:
        return perplexity_by_language(model, tok, {"code": texts}, args.seq_len)["code"]["perplexity"]

    def ppl_of_folder(directory: Path) -> float:  # exactly `quintet eval perplexity --model DIR ...`
        result = evaluate_perplexity(directory, [held_file], max_length=args.seq_len)
        return result["languages"]["code"]["perplexity"]

    docs = [tok.encode(t) for t in texts]
    calib = work / "calibration.jsonl"
    calib.write_text("".join(json.dumps({"text": t}) + "\n" for t in train[1::3]))
    rows = []
    float_model = JambaForCausalLM.from_pretrained(folder)
    base = ppl_of_folder(folder)
    inputs = _linear_inputs(float_model, eval_ids[: 16 * args.seq_len].view(-1, args.seq_len))
    rows.append({"weights": "float32", "group": "-", "perplexity": base, "relative": 0.0, "layer error": 0.0})
    for group in (32, 64, 128):
        for method in ("rtn", "gptq"):
            out = work / f"fp4-g{group}-{method}"
            summary = quantize_folder(
                folder,
                out,
                group_size=group,
                gptq=calib if method == "gptq" else None,
                gptq_samples=args.gptq_samples,
                gptq_seq_len=args.seq_len,
            )
            ppl = ppl_of(load_dequantized(out))
            ppl_engine = ppl_of_folder(out)
            decode = {
                act: _decode_perplexity(
                    load_quantized(out, activations=act), docs, args.seq_len, args.decode_tokens
                )
                for act in ("float32", "int8")
            }
            rows.append(
                {
                    "weights": f"FP4 {method}",
                    "group": group,
                    "perplexity": ppl,
                    "relative": ppl / base - 1,
                    "engine perplexity": ppl_engine,
                    "decode perplexity": decode["float32"],
                    "decode perplexity, int8 activations": decode["int8"],
                    "layer error": _layer_error(float_model, out, inputs),
                    "file / float32": summary["bytes_after"] / summary["bytes_before"],
                }
            )
            print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    rows[0]["engine perplexity"] = ppl_of(to_engine(JambaForCausalLM.from_pretrained(folder)))
    rows[0]["decode perplexity"] = _decode_perplexity(
        to_engine(JambaForCausalLM.from_pretrained(folder)), docs, args.seq_len, args.decode_tokens
    )
    rows[0]["decode perplexity, int8 activations"] = "-"  # no 4-bit matmuls
    rows[0]["file / float32"] = 1.0
    print(
        f"model {folder} ({'given' if args.quality_model else f'trained {args.train_steps} steps here'}); "
        f"held-out: {eval_ids.numel()} tokens of {len(texts)} stdlib modules ({held_file}), rolling windows "
        f"of {args.seq_len}; "
        f"GPTQ calibration: {args.gptq_samples} x {args.seq_len} tokens; threads={args.threads}; decode "
        f"perplexity: the first {args.decode_tokens} held-out tokens, each from a one-token step (int8 "
        f"activations run integer dot products here: {int8_activations_available()})"
    )
    print(
        markdown_table(
            rows,
            [
                "weights",
                "group",
                "perplexity",
                "relative",
                "engine perplexity",
                "decode perplexity",
                "decode perplexity, int8 activations",
                "layer error",
                "file / float32",
            ],
        )
    )
    write_results(
        args.out,
        "deploy_quality",
        rows,
        threads=args.threads,
        model=str(folder),
        train_steps=args.train_steps,
        eval_tokens=int(eval_ids.numel()),
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="part", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--runs", type=int, default=3)
    s.add_argument("--models", default="jamba-small", help="presets, with overrides as preset:key=v;key=v")
    s.add_argument("--prompt", type=int, default=512)
    s.add_argument("--new-tokens", type=int, default=64)
    s.add_argument("--out", default="runs/benchmarks/deploy_speed.json")
    q = sub.add_parser("quality")
    q.add_argument("--threads", type=int, default=1)
    q.add_argument("--quality-model", help="a trained Jamba folder with a byte-level vocabulary")
    q.add_argument("--train-steps", type=int, default=600)
    q.add_argument("--batch", type=int, default=16)
    q.add_argument("--seq-len", type=int, default=256)
    q.add_argument("--eval-tokens", type=int, default=65536)
    q.add_argument("--gptq-samples", type=int, default=64)
    q.add_argument("--decode-tokens", type=int, default=8192, help="tokens predicted by decode steps")
    q.add_argument("--work", default="runs/benchmarks/deploy_quality")
    q.add_argument("--out", default="runs/benchmarks/deploy_quality.json")
    args = parser.parse_args()
    set_threads(args.threads)
    speed(args) if args.part == "speed" else quality(args)


if __name__ == "__main__":
    main()

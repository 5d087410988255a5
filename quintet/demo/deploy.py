"""`make demo`, deployment part: FP4 quantization of the aligned model, its size and speed against float32."""

from __future__ import annotations

import pathlib
import time


def run_deploy_demo(model_dir: pathlib.Path, out_dir: pathlib.Path) -> None:
    """Quantize `model_dir` to FP4 in `out_dir`, generate with both, print size and speed side by side."""
    import torch

    from quintet.deploy.convert import quantize_folder
    from quintet.deploy.engine import measure_generation
    from quintet.deploy.quantized_folder import load_quantized
    from quintet.models.jamba import JambaForCausalLM
    from quintet.tokenizer import load_tokenizer

    start = time.perf_counter()
    summary = quantize_folder(model_dir, out_dir, group_size=64)
    seconds = time.perf_counter() - start
    before, after = summary["bytes_before"], summary["bytes_after"]
    print(f"quantized {summary['modules_quantized']} modules to M0E4 (group 64) in {seconds:.1f} s")
    print(
        f"weights: {before / 2**20:.1f} MiB (float32) -> {after / 2**20:.1f} MiB (FP4; {after / before:.3f}x)"
    )
    float_model = JambaForCausalLM.from_pretrained(model_dir)
    fp4_model = load_quantized(out_dir)
    tokenizer = load_tokenizer(model_dir, vocab_size=float_model.config.vocab_size)
    prompt = "The deployment engine turns the model into"
    ids = torch.tensor([tokenizer.encode(prompt)])
    vocab_limit = min(tokenizer.vocab_size, float_model.config.vocab_size)
    print(f"threads: {torch.get_num_threads()}; prompt: {prompt!r} ({ids.shape[1]} tokens), 32 new tokens")
    rows = []
    for name, model in (("float32", float_model), ("FP4 engine", fp4_model)):
        measure_generation(model, ids, 4, vocab_limit)  # warm-up
        stats = measure_generation(model, ids, 32, vocab_limit)
        rows.append((name, stats))
        text = tokenizer.decode(stats["tokens"])
        print(
            f"  {name:11s} prefill {stats['prefill_tok_s']:7.1f} tok/s  "
            f"decode {stats['decode_tok_s']:6.1f} tok/s  -> {text!r}"
        )
    ratio = rows[1][1]["decode_tok_s"] / rows[0][1]["decode_tok_s"]
    same = sum(a == b for a, b in zip(rows[0][1]["tokens"], rows[1][1]["tokens"], strict=True))
    print(f"FP4 decode speed: {ratio:.2f}x float32; greedy tokens equal to float32's: {same}/32")
    if before < 32 * 2**20:
        print(
            f"  ({before / 2**20:.0f} MiB of float32 weights fit in the CPU's cache, where reading 4 bits "
            "instead of 32 saves little; FP4 pays on models that do not fit: docs/BENCHMARKS.md, "
            "'Deployment: against llama.cpp on the same weights')"
        )

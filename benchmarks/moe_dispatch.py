"""MoE dispatch: quintet's sorted dispatch against transformers' Jamba MoE block and two naive loops.

    python benchmarks/moe_dispatch.py [--threads 1] [--runs 7] [--out runs/benchmarks/moe_dispatch.json]

Same weights and inputs for all (jamba-small's MoE shape: hidden 512, 8 experts of 1024, top-2):
- quintet: (token, slot) pairs sorted by expert, each expert once on its tokens;
- transformers: `JambaSparseMoeBlock` of transformers (one-hot mask, an expert loop with torch.where);
- dense: every expert over every token, weighted by a zero-padded routing matrix;
- per-token: a Python loop over tokens and their k experts.
Prints time per call and the ratio of each to quintet (median of --runs).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import markdown_table, median_seconds, set_threads, write_results  # noqa: E402

from quintet.models.jamba import JambaConfig  # noqa: E402
from quintet.models.jamba.moe import JambaSparseMoeBlock  # noqa: E402


def transformers_block(ours: JambaSparseMoeBlock, cfg: JambaConfig) -> torch.nn.Module:
    hf_cfg = transformers.JambaConfig(
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.num_experts_per_tok,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
    )
    theirs = transformers.models.jamba.modeling_jamba.JambaSparseMoeBlock(hf_cfg)
    with torch.no_grad():
        theirs.router.weight.copy_(ours.router.weight)
        for e, expert in enumerate(ours.experts):
            theirs.experts.gate_up_proj[e].copy_(torch.cat([expert.gate_proj.weight, expert.up_proj.weight]))
            theirs.experts.down_proj[e].copy_(expert.down_proj.weight)
    return theirs.eval()


def dense(block: JambaSparseMoeBlock, x: torch.Tensor) -> torch.Tensor:
    probs = torch.softmax(block.router(x).float(), dim=-1)
    top = torch.topk(probs, block.top_k, dim=-1)
    weights = torch.zeros_like(probs).scatter(-1, top.indices, top.values).to(x.dtype)
    return sum(weights[:, e : e + 1] * expert(x) for e, expert in enumerate(block.experts))


def per_token(block: JambaSparseMoeBlock, x: torch.Tensor) -> torch.Tensor:
    probs = torch.softmax(block.router(x).float(), dim=-1)
    top = torch.topk(probs, block.top_k, dim=-1)
    rows = []
    for t in range(x.shape[0]):
        row = x.new_zeros(x.shape[1])
        for w, e in zip(top.values[t].tolist(), top.indices[t].tolist(), strict=True):
            row = row + w * block.experts[e](x[t : t + 1])[0]
        rows.append(row)
    return torch.stack(rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--tokens", default="1,16,256,2048")
    parser.add_argument("--out", default="runs/benchmarks/moe_dispatch.json")
    args = parser.parse_args()
    set_threads(args.threads)
    torch.manual_seed(0)
    cfg = JambaConfig.from_preset("jamba-small")
    ours = JambaSparseMoeBlock(cfg).eval()
    for p in ours.parameters():
        torch.nn.init.normal_(p, std=0.05)
    theirs = transformers_block(ours, cfg)
    rows = []
    with torch.inference_mode():
        for n in map(int, args.tokens.split(",")):
            x = torch.randn(1, n, cfg.hidden_size)
            flat = x[0]
            ref = ours(x)[0][0]
            torch.testing.assert_close(theirs(x)[0], ref, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(dense(ours, flat), ref, atol=1e-4, rtol=1e-4)
            t_ours = median_seconds(lambda x=x: ours(x), args.runs)
            t_hf = median_seconds(lambda x=x: theirs(x), args.runs)
            t_dense = median_seconds(lambda f=flat: dense(ours, f), args.runs)
            t_tok = (
                median_seconds(lambda f=flat: per_token(ours, f), max(1, args.runs // 2))
                if n <= 256
                else None
            )
            rows.append(
                {
                    "tokens": n,
                    "quintet_ms": 1e3 * t_ours,
                    "transformers_ms": 1e3 * t_hf,
                    "dense_ms": 1e3 * t_dense,
                    "per_token_ms": "-" if t_tok is None else 1e3 * t_tok,
                    "transformers/quintet": t_hf / t_ours,
                    "dense/quintet": t_dense / t_ours,
                    "per_token/quintet": "-" if t_tok is None else t_tok / t_ours,
                }
            )
    print(
        f"MoE dispatch, jamba-small shape (hidden 512, 8 experts x 1024, top-2), threads={args.threads}, "
        f"median of {args.runs}"
    )
    print(markdown_table(rows, list(rows[0])))
    write_results(args.out, "moe_dispatch", rows, threads=args.threads, runs=args.runs)


if __name__ == "__main__":
    main()

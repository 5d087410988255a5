"""Each fusion of the deployment engine against its unfused form, on jamba-small's shapes, one process.

    python benchmarks/deploy_fusions.py [--threads 1] [--runs 7] [--out runs/benchmarks/deploy_fusions.json]

- residual + RMSNorm: `x + h` then Jamba's RMSNorm (five element-wise ops) against `add_rms_norm`;
- SwiGLU: gate and up as two matmuls against one merged gate/up matmul (M0E4 weights, jamba-small MLP);
- merged QKV: three projections against one (M0E4, jamba-small attention: 512 -> 512 + 128 + 128);
- dequantization inside the matmul: quintet's M0E4 GEMV against dequantizing the weight and a float32
  matmul, per call; and the GEMV against the dequantized-tiles path by rows (the decode / prefill split,
  `quintet.kernels.m0e4_cpu.GEMV_MAX_ROWS`); and, on the prefill path, L1 micro-tiles with our own kernel
  against large tiles with PyTorch's matmul, by rows, with float32 and bfloat16 products (float32:
  `MICRO_TILE_MAX_ROWS`), for jamba-small's gate/up and down shapes;
- the whole FP4 decode step with fusions on and off, and with float32 or bfloat16 activations between
  matmuls (decode matmul inputs float32 in these rows);
- the whole decode step through the modules against the engine's decode plan (the whole step in one
  native call, its weights bound once: `quintet.deploy.decode_plan`), FP4 with float32 and int8
  activations, and the float32 engine.
Decode = 1 row, prefill = 512 rows. Times are medians of --runs; "speedup" = unfused time / fused time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import markdown_table, median_seconds, set_threads, write_results  # noqa: E402

from quintet.deploy.convert import quantize_folder  # noqa: E402
from quintet.deploy.engine import to_engine  # noqa: E402
from quintet.deploy.fusions import add_rms_norm, merge_linears  # noqa: E402
from quintet.deploy.qlinear import M0E4Linear  # noqa: E402
from quintet.deploy.quantized_folder import load_quantized  # noqa: E402
from quintet.kernels import m0e4_cpu  # noqa: E402
from quintet.kernels.m0e4 import quantize_rtn  # noqa: E402
from quintet.kernels.m0e4_cpu import m0e4_matmul, matmul_path  # noqa: E402
from quintet.loading import load_model  # noqa: E402
from quintet.models.jamba import JambaConfig  # noqa: E402
from quintet.models.jamba.create import create_model  # noqa: E402
from quintet.models.jamba.norm import RMSNorm  # noqa: E402


def _m0e4(n: int, k: int, group: int = 64) -> M0E4Linear:
    return M0E4Linear.from_quantized(quantize_rtn(torch.randn(n, k) * 0.02, group))


def _prefill(limit: int, args_: tuple, bf16: bool) -> torch.Tensor:
    """The prefill matmul with micro-tiles up to `limit` rows (0: large tiles only)."""
    x, q, s, o, g = args_
    code = m0e4_cpu.ISAS.index(m0e4_cpu.isa())
    return m0e4_cpu._kernel.get().matmul_tiles(x, q, s, o, g, code, bf16, limit, m0e4_cpu.TILE_BYTES)


def _row(rows: list, name: str, shape: str, unfused, fused, runs: int) -> None:
    t0, t1 = median_seconds(unfused, runs), median_seconds(fused, runs)
    rows.append(
        {"fusion": name, "shape": shape, "unfused us": t0 * 1e6, "fused us": t1 * 1e6, "speedup": t0 / t1}
    )
    print(f"  {rows[-1]}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--out", default="runs/benchmarks/deploy_fusions.json")
    args = parser.parse_args()
    set_threads(args.threads)
    torch.manual_seed(0)
    cfg = JambaConfig.from_preset("jamba-small")
    h, inter = cfg.hidden_size, cfg.intermediate_size
    rows: list[dict] = []
    with torch.inference_mode():
        # residual + RMSNorm
        norm = RMSNorm(h)
        norm.weight.data = torch.rand(h) + 0.5
        for dtype in (torch.float32, torch.bfloat16):
            norm = norm.to(dtype)
            for m in (1, 512):
                x, r = torch.randn(1, m, h, dtype=dtype), torch.randn(1, m, h, dtype=dtype)
                _row(
                    rows,
                    "residual + RMSNorm",
                    f"({m}, {h}) {str(dtype)[6:]}",
                    lambda x=x, r=r, norm=norm: (lambda s: (s, norm(s)))(x + r),
                    lambda x=x, r=r, norm=norm: add_rms_norm(x, r, norm.weight, norm.eps),
                    args.runs,
                )
        # SwiGLU gate/up merged, QKV merged (M0E4)
        gate, up = _m0e4(inter, h), _m0e4(inter, h)
        gate_up = merge_linears([gate, up])
        q, k, v = _m0e4(h, h), _m0e4(128, h), _m0e4(128, h)
        qkv = merge_linears([q, k, v])
        for m, path in ((1, "gemv"), (512, "tiles")):
            x = torch.randn(m, h)
            with matmul_path(path):
                _row(
                    rows,
                    "SwiGLU gate/up merged",
                    f"({m}, {h}) -> 2 x {inter}, {path}",
                    lambda x=x: F.silu(gate(x)) * up(x),
                    lambda x=x: (lambda g, u: F.silu(g) * u)(*gate_up(x).split(inter, dim=-1)),
                    args.runs,
                )
                _row(
                    rows,
                    "QKV merged",
                    f"({m}, {h}) -> {h} + 128 + 128, {path}",
                    lambda x=x: (q(x), k(x), v(x)),
                    lambda x=x: qkv(x).split([h, 128, 128], dim=-1),
                    args.runs,
                )
        # dequantization inside the matmul
        for n, kk in ((2 * inter, h), (h, inter), (cfg.vocab_size, h)):
            layer = _m0e4(n, kk)
            x = torch.randn(1, kk)
            _row(
                rows,
                "dequant in the matmul (M0E4 GEMV)",
                f"(1, {kk}) x ({n}, {kk})",
                lambda layer=layer, x=x: F.linear(x, layer.dequantized_weight(torch.float32)),
                lambda layer=layer, x=x: layer(x),
                args.runs,
            )
        layer = _m0e4(2 * inter, h)
        for m in (1, 2, 4, 8, 16, 32, 128, 512):
            x = torch.randn(m, h)
            args_ = (x, layer.qweight, layer.scales, layer.offsets, layer.group_size)
            _row(
                rows,
                "M0E4 GEMV vs dequantized tiles",
                f"({m}, {h}) x ({2 * inter}, {h})",
                lambda args_=args_: m0e4_matmul(*args_, path="tiles"),
                lambda args_=args_: m0e4_matmul(*args_, path="gemv"),
                args.runs,
            )
        for bf16 in (False, True):
            for n, kk in ((2 * inter, h), (h, inter)):
                layer = _m0e4(n, kk)
                for m in (8, 16, 32, 64, 96, 128, 256, 512):
                    x = torch.randn(m, kk)
                    args_ = (x, layer.qweight, layer.scales, layer.offsets, layer.group_size)
                    _row(
                        rows,
                        f"prefill: L1 micro-tiles vs large tiles, {'bfloat16' if bf16 else 'float32'}",
                        f"({m}, {kk}) x ({n}, {kk})",
                        lambda args_=args_, bf16=bf16: _prefill(0, args_, bf16),
                        lambda args_=args_, m=m, bf16=bf16: _prefill(m, args_, bf16),
                        args.runs,
                    )
        # whole decode steps
        with tempfile.TemporaryDirectory() as tmp:
            create_model("jamba-small", Path(tmp) / "f", seed=0)
            quantize_folder(Path(tmp) / "f", Path(tmp) / "q", group_size=64)
            q = Path(tmp) / "q"
            makers = {
                "fused": lambda: load_quantized(q, activations="float32"),
                "int8 activations": lambda: load_quantized(q, activations="int8"),
                "float32 engine": lambda: to_engine(load_model(Path(tmp) / "f")),
            }
            engines = {name: make() for name, make in makers.items()}
            engines["unfused"] = load_quantized(q, fuse=False, activations="float32")
            engines["bfloat16 activations"] = load_quantized(q, dtype=torch.bfloat16, activations="float32")
            engines["bfloat16 activations"].decode_plan = None  # compared with "fused, modules"
            for name, make in makers.items():  # the same engines with their decode plan switched off
                engines[f"{name}, modules"] = engine = make()
                engine.decode_plan = None
            prompt = torch.randint(3, cfg.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0))
            steps = {}
            for name, eng in engines.items():
                cache = eng.new_cache()
                eng(prompt, cache=cache)
                token = torch.tensor([[5]])
                steps[name] = lambda eng=eng, cache=cache, token=token: eng(
                    token, cache=cache, logits_to_keep=1
                )
            _row(
                rows,
                "engine decode step: fusions",
                "jamba-small FP4, past 128",
                steps["unfused"],
                steps["fused, modules"],
                args.runs,
            )
            _row(
                rows,
                "engine decode step: float32 activations (vs bf16)",
                "jamba-small FP4, past 128",
                steps["bfloat16 activations"],
                steps["fused, modules"],
                args.runs,
            )
            for name, label in (
                ("fused", "FP4, float32 activations"),
                ("int8 activations", "FP4, int8 activations"),
                ("float32 engine", "float32 engine"),
            ):
                _row(
                    rows,
                    "engine decode step: decode plan (vs modules)",
                    f"jamba-small {label}, past 128",
                    steps[f"{name}, modules"],
                    steps[name],
                    args.runs,
                )
    print(f"threads={args.threads}, median of {args.runs}; speedup = unfused / fused")
    print(markdown_table(rows, ["fusion", "shape", "unfused us", "fused us", "speedup"]))
    write_results(args.out, "deploy_fusions", rows, threads=args.threads, runs=args.runs)


if __name__ == "__main__":
    main()

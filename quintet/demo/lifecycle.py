"""`make demo`: the whole lifecycle on data the project makes itself, about 15 minutes on 2 cores.

    python -m quintet.demo [--out runs/demo] [--full] [--skip-vitar]

1. Jamba: build jamba-small, print its size, layout and cache memory beside the paper's shape; generate.
2. Data (Aurora-M): demo corpus -> datatrove curation with statistics -> BPE tokenizer -> token shards.
3. Safety sets: red-team prompts by category and language; their train split becomes safety instructions.
4. Continual pretraining: a jamba-tiny base, its vocabulary extended to the tokenizer, through CAP then
   CAT (instructions and safety data mixed in); loss curve and held-out loss per language.
5. Alignment: SFT, then stepwise DPO (easy -> hard) on checkable answers and refusal pairs.
6. Red-team: the model after CAP (before safety tuning) against the aligned one, by category and language.
7. Deployment: M0E4 FP4 quantization of the aligned model; size and speed against float32.
   Then the aligned model and its FP4 copy red-teamed side by side: rates, differences, changed verdicts.
   Then the FP4 model served (`quintet serve`), one chat request through the `openai` client.
8. ViTAR: a tiny ViTAR trained at several resolutions, tested far above them.

`--full` trains longer (more tokens, steps and images); every stage is also a CLI command of its own.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from quintet.commands import add_debug_flag, run_command, show_defaults
from quintet.generation import GenerationConfig, stream_text
from quintet.models.jamba import JambaConfig
from quintet.models.jamba.create import create_model
from quintet.models.jamba.info import format_info, model_info
from quintet.tokenizer import load_tokenizer


def banner(title: str) -> None:
    print(f"\n{'=' * 8} {title} {'=' * 8}", flush=True)


def jamba_model_stage(out: Path) -> None:
    banner("1. Jamba: jamba-small, and the paper's shape counted from its config")
    model = create_model("jamba-small", out, seed=0, overwrite=True)  # the demo writes it afresh
    print(format_info(model_info(model.config)))
    print()
    print(format_info(model_info(JambaConfig.from_preset("jamba-v0.1"))))
    tokenizer = load_tokenizer(out, vocab_size=model.config.vocab_size)
    start = time.perf_counter()
    text = "".join(stream_text(model, tokenizer, "Hello, Jamba", GenerationConfig(max_new_tokens=24)))
    print(f"untrained, byte-level: 'Hello, Jamba' -> {text!r} ({time.perf_counter() - start:.1f} s)")


def _write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def safety_and_instruction_stage(out: Path, tokenizer_path: Path) -> dict[str, Path]:
    """Red-team sets, and the CAT stage's extra sources (instructions, safety) as token shards."""
    from quintet.align.demo_preferences import make_demo_preferences
    from quintet.chat import apply_chat_template
    from quintet.data.shards import tokenize_curated
    from quintet.safety.redteam_sets import build_redteam_prompts, build_redteam_sets, safety_sft_rows

    banner("3. Safety sets and instruction data")
    sets = build_redteam_sets(out / "redteam")
    train, evaluation = build_redteam_prompts()
    print(f"red-team prompts: {len(train)} train, {len(evaluation)} eval ({sets})")
    prefs = make_demo_preferences(per_cell=12, seed=0)

    def chat(prompt: str, answer: str) -> str:
        return apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        )

    instructions = [
        {"id": f"instr-{i}", "text": chat(p.prompt, p.chosen), "prompt": p.prompt, "completion": p.chosen}
        for i, p in enumerate(prefs)
        if p.split == "train"
    ]
    safety = safety_sft_rows(train)
    _write_rows(out / "cat-extra" / "instructions" / "part-0.jsonl", instructions)
    _write_rows(
        out / "cat-extra" / "safety" / "part-0.jsonl", [{"id": r["id"], "text": r["text"]} for r in safety]
    )
    index = tokenize_curated(out / "cat-extra", tokenizer_path, out / "cat-shards", heldout_fraction=0.05)
    sft_rows = [{"prompt": r["prompt"], "completion": r["completion"]} for r in instructions + safety[::4]]
    _write_rows(out / "sft.jsonl", sft_rows)
    print(f"instructions: {len(instructions)} rows, safety instructions: {len(safety)} rows -> {index}")
    return {"index": index, "sft": out / "sft.jsonl", "redteam_eval": sets["eval"]}


def pretraining_stage(out: Path, shards: list[Path], tokenizer_vocab: int, full: bool) -> Path:
    from quintet.train.curriculum import aurora_m_stages
    from quintet.train.lm import train_lm
    from quintet.train.lm_config import DataSection, ModelSection, OptimSection, RunSection, TrainConfig

    banner("4. Continual pretraining: CAP then CAT (Aurora-M), from a jamba-tiny base")
    base = out / "base"
    create_model("jamba-tiny", base, seed=0, overwrite=True)
    web = {"en": 1.0, "fi": 1.0, "hi": 1.0, "ja": 1.0, "vi": 1.0, "code": 1.0}
    cat = {**web, "code": 0.5, "instructions": 2.0, "safety": 2.0}
    total = 2_000_000 if full else 160_000
    curriculum = aurora_m_stages(total, web, cat, lr=3e-3, min_lr=3e-4, cat_lr=1.5e-3)
    for stage in curriculum.stages:
        print(f"stage {stage.name}: {stage.tokens:,} tokens, mixture {stage.weights}")
    cfg = TrainConfig(
        model=ModelSection(init_from=str(base), vocab_size=tokenizer_vocab),
        data=DataSection(shards=[str(s) for s in shards], seq_len=128),
        curriculum=curriculum,
        optim=OptimSection(micro_batch_size=16, grad_accum=1, weight_decay=0.1),
        run=RunSection(out_dir=str(out / "pretrain"), checkpoint_every=100, heldout_tokens=2048),
    )
    start = time.perf_counter()
    result = train_lm(cfg, overwrite=True)  # a rerun of the demo starts its pretraining over
    rows = [json.loads(line) for line in result.metrics.read_text().splitlines()]
    for name in ("CAP", "CAT"):
        losses = [r["loss"] for r in rows if r.get("stage") == name and "loss" in r]
        print(f"{name}: training loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps")
    history = {h["stage"]: h["heldout_loss"] for h in result.state.history}
    langs = sorted(history["CAP"])
    print("held-out loss per source   " + "  ".join(f"{s:>12}" for s in langs))
    for stage, losses in history.items():
        print(f"after {stage:<21}" + "  ".join(f"{losses.get(s, float('nan')):12.3f}" for s in langs))
    print(
        f"{time.perf_counter() - start:.0f} s; curve: {result.out_dir / 'loss.png'}; "
        f"model: {result.final_model}"
    )
    return result.out_dir


def alignment_stage(out: Path, pretrained: Path, sft_rows: Path, full: bool) -> Path:
    from quintet.align.demo_preferences import make_demo_preferences
    from quintet.align.preference_data import write_preferences
    from quintet.align.run import run_sdpo, run_sft
    from quintet.safety.redteam_sets import build_redteam_prompts, safety_preference_pairs

    banner("5. Alignment: SFT, then stepwise DPO (easy -> hard by the SFT model's own margin)")
    prefs = make_demo_preferences(per_cell=12, seed=1)
    train, _ = build_redteam_prompts()
    safety_pairs = safety_preference_pairs(train)[:: 16 if not full else 2]
    write_preferences(out / "prefs.jsonl", [p for p in prefs if p.split == "train"] + safety_pairs)
    write_preferences(out / "prefs-eval.jsonl", [p for p in prefs if p.split == "eval"])
    epochs = 2 if full else 1
    (out / "sft.toml").write_text(
        f'[model]\npath = "{pretrained}"\n[data]\ntrain = "{sft_rows}"\n'
        f"[sft]\nlr = 1e-3\nbatch_size = 16\nepochs = {epochs}\nmax_length = 192\nchat_template = true\n"
        f'[run]\nout_dir = "{out / "sft"}"\n'
    )
    sft = run_sft(out / "sft.toml", progress=False)
    print(f"SFT: {sft['steps']} steps, final loss {sft['final_loss']:.3f}")
    (out / "sdpo.toml").write_text(
        f'[model]\npath = "{out / "sft" / "model"}"\n'
        f'[data]\ntrain = "{out / "prefs.jsonl"}"\neval = "{out / "prefs-eval.jsonl"}"\n'
        f"[dpo]\nbeta = 0.1\nlr = 2e-4\nbatch_size = 16\nmax_length = 192\nepochs = {epochs}\n"
        "chat_template = true\n"
        f'[sdpo]\nsteps = 2\nsplit = "easy_to_hard"\n[run]\nout_dir = "{out / "sdpo"}"\n'
    )
    summary = run_sdpo(out / "sdpo.toml", progress=False)
    for step in summary["steps"]:
        m = step["final"]
        print(
            f"sDPO step {step['step']}: {step['pairs']} pairs, "
            f"reference margin {step['reference_margin']:+.2f}; "
            f"rewards/accuracies {m['rewards/accuracies']:.2f}, rewards/margins {m['rewards/margins']:+.3f}, "
            f"loss {m['loss']:.3f}"
        )
    print(
        f"held-out preference accuracy: {summary['eval_accuracy_before']:.3f} (SFT) -> "
        f"{summary['eval_accuracy_after']:.3f} (sDPO)"
    )
    return Path(summary["model"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="folder for every stage's output")
    parser.add_argument("--full", action="store_true", help="train longer at every stage")
    parser.add_argument("--skip-vitar", action="store_true", help="leave out the ViTAR stages")
    add_debug_flag(parser)
    show_defaults(parser)
    parser.set_defaults(func=run_demo)
    return run_command(parser.parse_args(argv), prog="python -m quintet.demo")


def run_demo(args: argparse.Namespace) -> int:
    """Every stage, one after another, into `args.out` (a rerun starts each stage over)."""
    out: Path = args.out
    start = time.perf_counter()

    jamba_model_stage(out / "jamba-small")

    from quintet.demo.data import run_data_demo

    banner("2. Data: curation on datatrove, tokenizer, token shards")
    data = run_data_demo(out / "data")
    safety = safety_and_instruction_stage(out / "safety", data["tokenizer"])
    vocab = load_tokenizer(data["tokenizer"].parent).vocab_size
    pretrain = pretraining_stage(out, [data["shard_index"].parent, safety["index"].parent], vocab, args.full)
    aligned = alignment_stage(out / "align", pretrain / "final", safety["sft"], args.full)

    from quintet.demo.redteam import run_redteam_demo

    banner("6. Red-team: after CAP (no safety data yet) against the aligned model")
    run_redteam_demo(pretrain / "stage-CAP", aligned, out / "redteam")

    from quintet.demo.deploy import run_deploy_demo

    banner("7. Deployment: M0E4 FP4 weights, the engine's generation")
    run_deploy_demo(aligned, out / "fp4")
    banner("7b. Red-team: the aligned model against its FP4 copy (does quantization erode safety?)")
    run_redteam_demo(aligned, out / "fp4", out / "redteam-fp4", names=("aligned", "FP4"))

    from quintet.align.demo_preferences import answer_is_correct
    from quintet.align.preference_data import read_preferences
    from quintet.demo.serve import run_serve_demo

    banner("7c. Serve: the FP4 model behind an OpenAI-compatible server, one chat request")
    held_out = next(p for p in read_preferences(out / "align" / "prefs-eval.jsonl") if p.lang == "en")
    answer = run_serve_demo(out / "fp4", held_out.prompt)
    verdict = "right" if answer_is_correct(answer, held_out.answer) else "wrong"
    print(f"(a held-out alignment question, answer {held_out.answer}: the served model is {verdict})")

    if not args.skip_vitar:
        from quintet.demo.vision import run_vitar_demo

        banner("8. ViTAR: any resolution")
        run_vitar_demo(out / "vitar", quick=not args.full)
    print(f"\ndemo finished in {time.perf_counter() - start:.0f} s; everything is under {out}")
    return 0

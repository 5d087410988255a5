"""The language-model trainer: Jamba on token shards through a curriculum of stages.

    python -m quintet.train lm CONFIG [--resume]                      one process
    torchrun --nproc-per-node N -m quintet.train lm CONFIG [--resume]  DDP, or FSDP2 with parallel = "fsdp"

Every process draws the same global batch from the mixture sampler (same seed) and trains on its own
slice of it, so N processes with micro_batch_size B follow the loss curve of one process with N * B.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from tqdm import tqdm

from quintet.errors import OutputInUseError
from quintet.io import copy_model_files, output_lock
from quintet.loading import load_trainable_model
from quintet.models.jamba import JambaConfig, JambaForCausalLM
from quintet.models.jamba.checkpoint import save_state_dict
from quintet.train.checkpoint import (
    checkpoint_dir,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    truncate_metrics,
)
from quintet.train.curriculum import Stage
from quintet.train.distributed import DistInfo, all_reduce_mean, setup_distributed, teardown, wrap_model
from quintet.train.lm_config import TrainConfig


@dataclass
class TrainerState:
    step: int = 0
    stage: int = 0  # index of the stage in progress
    stage_tokens: int = 0  # tokens trained in that stage
    total_tokens: int = 0
    sampler: dict[str, Any] | None = None  # data position in the current stage
    history: list[dict[str, Any]] = field(default_factory=list)  # per finished stage: held-out losses


log = logging.getLogger("quintet.train")


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN or infinite."""


class ResumeError(ValueError):
    """A checkpoint cannot be resumed with this configuration."""


@dataclass
class TrainResult:
    out_dir: Path
    final_model: Path
    state: TrainerState
    metrics: Path


# ---------------------------------------------------------------------------------------------- model
def build_model(cfg: TrainConfig) -> JambaForCausalLM:
    """A fresh model from a preset, or a model folder to continue from, with the vocabulary extended."""
    if cfg.model.preset is not None:
        model = JambaForCausalLM(JambaConfig.from_preset(cfg.model.preset))
    else:
        model = load_trainable_model(cfg.model.init_from)
    if cfg.model.vocab_size is not None:
        extend_vocab(model, cfg.model.vocab_size)
    return model


@torch.no_grad()
def extend_vocab(model: JambaForCausalLM, vocab_size: int) -> None:
    """Grow the embedding and the output head to `vocab_size`; new rows start at the mean of the old ones."""
    old = model.config.vocab_size
    if vocab_size < old:
        raise ValueError(
            f"[model].vocab_size = {vocab_size}: smaller than the model's {old}; only growing is supported"
        )
    if vocab_size == old:
        return
    for module in (model.model.embed_tokens, model.lm_head):
        weight = module.weight
        grown = torch.cat([weight, weight.mean(0, keepdim=True).expand(vocab_size - old, -1)])
        module.weight = torch.nn.Parameter(grown.contiguous())
    model.model.embed_tokens.num_embeddings = vocab_size
    model.lm_head.out_features = vocab_size
    model.config.vocab_size = vocab_size
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight


def _optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on norms, biases, the Mamba A_log and D (as Mamba does)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.dim() < 2 or name.endswith("A_log") else decay).append(p)
    o = cfg.optim
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=0.0, betas=(o.beta1, o.beta2), eps=o.eps)


def _autocast(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    precision = cfg.run.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------- data
def open_stage_data(cfg: TrainConfig, stage: Stage, stage_index: int) -> Any:
    """The mixture sampler of one stage: fixed-length windows drawn from named sources by weight."""
    from quintet.data.mixture import MixtureSampler

    return MixtureSampler(
        cfg.data.shards, stage.weights, seq_len=cfg.data.seq_len, seed=cfg.run.seed + stage_index
    )


def _global_micro_batch(sampler: Any, rows: int) -> tuple[torch.Tensor, list[str]]:
    windows, sources = [], []
    for _ in range(rows):
        tokens, source = next(sampler)
        windows.append(torch.as_tensor(tokens, dtype=torch.long))
        sources.append(source)
    return torch.stack(windows), sources


@torch.no_grad()
def heldout_losses(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> dict[str, float]:
    """Mean next-token loss per held-out source (language), on up to `heldout_tokens` tokens each."""
    from quintet.data.mixture import heldout_windows

    was_training = model.training
    model.eval()
    out = {}
    for source, windows in heldout_windows(cfg.data.shards, cfg.data.seq_len, cfg.run.heldout_tokens).items():
        losses = [float(model(w[None].to(device), labels=w[None].to(device)).loss) for w in windows]
        if losses:
            out[source] = sum(losses) / len(losses)
    model.train(was_training)
    return out


# ---------------------------------------------------------------------------------------------- loop
def train_lm(
    cfg: TrainConfig, resume: bool = False, progress: bool = True, overwrite: bool = False
) -> TrainResult:
    """Run (or `resume`) the curriculum; returns where the final model and the metrics are.

    The run holds `out_dir` for itself (`quintet.io.output_lock`). A folder that already holds a run is
    refused unless `resume` (continue from its newest checkpoint) or `overwrite` (delete what the trainer
    wrote there and start over)."""
    if resume and overwrite:
        raise ValueError("--resume and --overwrite: give one of them (continue the run, or start it over)")
    info = setup_distributed()
    try:
        out = Path(cfg.run.out_dir)
        if not info.is_main:  # the main process locks, checks and cleans the folder
            check_data_tokenizer(cfg)
            return _train(cfg, info, resume, progress)
        with output_lock(out, "training run"):
            check_data_tokenizer(cfg)  # before anything in out_dir is written or deleted
            prepare_out_dir(out, resume, overwrite)
            return _train(cfg, info, resume, progress)
    finally:
        teardown(info)


def _previous_run(out: Path) -> str | None:
    """What a folder holds of an earlier run ("checkpoint step-000120", "metrics.jsonl"), or None."""
    checkpoint = latest_checkpoint(out)
    if checkpoint is not None:
        return f"checkpoint {checkpoint.name}"
    if checkpoint_dir(out).is_dir() and any(checkpoint_dir(out).iterdir()):
        return f"{checkpoint_dir(out).name}/"
    metrics = out / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size:
        return "metrics.jsonl"
    return None


def prepare_out_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a folder holding an earlier run unless `resume` or `overwrite`; with `overwrite` remove what
    the trainer writes: checkpoints, metrics, stage and final models, the loss plot. Nothing else in the
    folder is touched."""
    out.mkdir(parents=True, exist_ok=True)
    previous = _previous_run(out)
    if previous is None or resume:
        return
    if not overwrite:
        raise OutputInUseError(
            f"{out}: holds an earlier training run ({previous}); pass --resume to continue it, or "
            "--overwrite to delete its checkpoints and metrics and start over (or choose another out_dir)"
        )
    import shutil

    for path in [checkpoint_dir(out), out / "final", *out.glob("stage-*")]:
        if path.is_dir():
            shutil.rmtree(path)
    for path in (out / "metrics.jsonl", out / "loss.png"):
        path.unlink(missing_ok=True)
    log.info("--overwrite: removed the earlier run's checkpoints and metrics in %s", out)


def _train(cfg: TrainConfig, info: DistInfo, resume: bool, progress: bool) -> TrainResult:
    out = Path(cfg.run.out_dir)
    torch.manual_seed(cfg.run.seed)
    if info.is_main:
        log.info("loading the model (%s)", cfg.model.init_from or f"preset {cfg.model.preset}")
    model = build_model(cfg).to(info.device)
    model.gradient_checkpointing = cfg.run.activation_checkpointing
    model.train()
    wrapped = wrap_model(model, info, cfg.run.parallel)
    optimizer = _optimizer(wrapped, cfg)
    sd_options = StateDictOptions(full_state_dict=True, cpu_offload=info.enabled)

    state = TrainerState()
    checkpoint = latest_checkpoint(out) if resume else None
    if resume and checkpoint is None:
        log.warning("--resume: no checkpoint in %s; starting from the beginning", out)
    if checkpoint is not None:
        saved = load_checkpoint(checkpoint)
        torch.set_rng_state(saved.rng["torch"])
        model_state, optim_state, state = saved.model_state, saved.optimizer, TrainerState(**saved.trainer)
        _check_resumable(model, model_state, checkpoint)
        set_state_dict(
            wrapped,
            optimizer,
            model_state_dict=model_state,
            optim_state_dict=optim_state,
            options=StateDictOptions(full_state_dict=True),
        )
        if info.is_main:
            log.info("resumed from %s (step %d, stage %d)", checkpoint, state.step, state.stage)

    def save() -> Path | None:
        model_sd, optim_sd = get_state_dict(wrapped, optimizer, options=sd_options)
        if not info.is_main:
            return None
        return save_checkpoint(
            out,
            state.step,
            lambda folder: save_state_dict(model.config, model_sd, folder),
            optim_sd,
            asdict(state),
            {"torch": torch.get_rng_state()},
        )

    def save_model_folder(folder: Path) -> None:
        model_sd = get_model_state_dict(wrapped, options=sd_options)  # a collective: every process calls it
        if info.is_main:
            save_state_dict(model.config, model_sd, folder)
            copy_tokenizer_files(cfg.data.shards, folder)

    metrics_path = out / "metrics.jsonl"
    if info.is_main:  # rows after the checkpoint (written before a kill) are written again below
        dropped = truncate_metrics(metrics_path, state.step)
        if dropped:
            log.info("%s: dropped %d rows after step %d, the checkpoint's", metrics_path, dropped, state.step)
    metrics = metrics_path.open("a") if info.is_main else None
    stages = cfg.curriculum.stages
    seq, micro, accum = cfg.data.seq_len, cfg.optim.micro_batch_size, cfg.optim.grad_accum
    tokens_per_step = seq * micro * accum * info.world_size
    params = [p for p in wrapped.parameters() if p.requires_grad]
    last_saved = checkpoint
    try:
        while state.stage < len(stages):
            stage = stages[state.stage]
            if info.is_main:
                log.info("stage %s: %d tokens from %s", stage.name, stage.tokens, cfg.data.shards)
            sampler = open_stage_data(cfg, stage, state.stage)
            if state.sampler is not None:
                sampler.load_state_dict(state.sampler)
            steps_left = math.ceil((stage.tokens - state.stage_tokens) / tokens_per_step)
            bar = tqdm(
                total=steps_left, desc=stage.name, unit="step", disable=not (progress and info.is_main)
            )
            while state.stage_tokens < stage.tokens:
                if cfg.run.max_steps is not None and state.step >= cfg.run.max_steps:
                    bar.close()
                    state.sampler = sampler.state_dict()
                    last_saved = save() or last_saved
                    return TrainResult(out, out / "final", state, metrics_path)
                lr = stage.lr_at(state.stage_tokens)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                start = time.perf_counter()
                loss_sum = torch.zeros((), device=info.device)
                aux_sum = torch.zeros((), device=info.device)
                for m in range(accum):
                    batch, _ = _global_micro_batch(sampler, micro * info.world_size)
                    batch = batch[info.rank * micro : (info.rank + 1) * micro].to(info.device)
                    sync = m == accum - 1 or not hasattr(wrapped, "no_sync")
                    with contextlib.nullcontext() if sync else wrapped.no_sync(), _autocast(cfg, info.device):
                        output = wrapped(batch, labels=batch, output_router_logits=True)
                    (output.loss / accum).backward()
                    loss_sum += output.loss.detach() / accum
                    if output.aux_loss is not None:
                        aux_sum += output.aux_loss.detach() / accum
                loss = float(all_reduce_mean(loss_sum, info))
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip or float("inf"))
                grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
                if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                    raise TrainingDiverged(
                        f"step {state.step + 1} (stage {stage.name}): loss = {loss}, "
                        f"grad norm = {grad_norm}; "
                        f"stopped before the update. Last good checkpoint: {last_saved or 'none yet'}. "
                        "Lower the learning rate or check the data, then resume."
                    )
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                state.stage_tokens += tokens_per_step
                state.total_tokens += tokens_per_step
                elapsed = time.perf_counter() - start
                record = {
                    "step": state.step,
                    "stage": stage.name,
                    "tokens": state.total_tokens,
                    "loss": loss,
                    "aux_loss": float(all_reduce_mean(aux_sum, info)),
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens_per_s": tokens_per_step / elapsed,
                }
                if metrics is not None and state.step % cfg.run.log_every == 0:
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
                bar.update()
                stage_done = state.stage_tokens >= stage.tokens
                if stage_done:
                    losses = heldout_losses(model, cfg, info.device)
                    state.history.append(
                        {
                            "stage": stage.name,
                            "step": state.step,
                            "tokens_by_source": sampler.tokens_drawn(),  # every rank draws the global batch
                            "heldout_loss": losses,
                        }
                    )
                    if metrics is not None:
                        metrics.write(json.dumps({"event": "stage_end", **state.history[-1]}) + "\n")
                        metrics.flush()
                    save_model_folder(out / f"stage-{stage.name}")  # each stage's result, loadable alone
                    state.stage += 1
                    state.stage_tokens = 0
                    state.sampler = None
                else:
                    state.sampler = sampler.state_dict()
                if stage_done or state.step % cfg.run.checkpoint_every == 0:
                    last_saved = save() or last_saved
                if stage_done:
                    break
            bar.close()
    finally:
        if metrics is not None:
            metrics.close()

    final = out / "final"
    save_model_folder(final)
    if info.is_main:
        plot_loss_curve(metrics_path, out / "loss.png")
    return TrainResult(out, final, state, metrics_path)


def check_data_tokenizer(cfg: TrainConfig) -> None:
    """Refuse shards whose ids mean something else to the model: ids past its vocabulary, or (continued
    pretraining) shards made with another tokenizer than the model folder's tokenizer.json, as recorded in
    the shards' index.json (`tokenizer.sha256`). Another tokenizer that keeps every token of the model's at
    the same id and only adds tokens (a vocabulary extension, `[model].vocab_size`) is accepted."""
    from quintet.data.shards import ShardError, load_index
    from quintet.data.tokenizer_training import tokenizer_sha256

    shards = cfg.data.shards if isinstance(cfg.data.shards, list) else [cfg.data.shards]
    index = load_index(shards[0])
    recorded = index["tokenizer"]
    where = Path(index["root"]) / "index.json"
    if cfg.model.vocab_size is not None:
        vocab_size = cfg.model.vocab_size
    elif cfg.model.preset is not None:
        vocab_size = JambaConfig.from_preset(cfg.model.preset).vocab_size
    else:
        vocab_size = JambaConfig.from_pretrained(cfg.model.init_from).vocab_size
    if recorded["vocab_size"] > vocab_size:
        raise ShardError(
            f"{where}: the shards' tokenizer has {recorded['vocab_size']} tokens, the model's vocab_size is "
            f"{vocab_size}; set [model].vocab_size = {recorded['vocab_size']} to extend it"
        )
    if cfg.model.init_from is None:
        return
    ours = Path(cfg.model.init_from) / "tokenizer.json"
    if not ours.is_file() or tokenizer_sha256(ours) == recorded["sha256"]:
        return  # a model without a tokenizer (fresh from `model init`) takes the shards' one
    theirs = Path(index["root"]) / recorded["file"]
    if _extends(ours, theirs):
        log.info("%s: extends the model's tokenizer %s (same ids, more tokens)", theirs, ours)
        return
    raise ShardError(
        f"{where}: the shards were made with another tokenizer (sha256 {recorded['sha256'][:12]}, "
        f"{recorded['vocab_size']} tokens) than the model's {ours} (sha256 {tokenizer_sha256(ours)[:12]}); "
        f"tokenize the data with {ours} (`quintet data tokenize --tokenizer {ours.parent}`)"
    )


def _extends(old: Path, new: Path) -> bool:
    """Whether tokenizer `new` holds every token of `old` at the same id."""
    from tokenizers import Tokenizer

    if not new.is_file():
        return False
    a = Tokenizer.from_file(str(old)).get_vocab(with_added_tokens=True)
    b = Tokenizer.from_file(str(new)).get_vocab(with_added_tokens=True)
    return all(b.get(token) == i for token, i in a.items())


def copy_tokenizer_files(shards: str | list[str], model_dir: Path) -> None:
    """Put the shards' tokenizer beside the trained weights, so the folder generates text on its own."""
    first = Path(shards[0] if isinstance(shards, list) else shards)
    folder = first if first.is_dir() else first.parent
    copy_model_files(folder, model_dir)


def _check_resumable(model: JambaForCausalLM, model_state: dict[str, torch.Tensor], path: Path) -> None:
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in model_state.items()}
    if model.config.tie_word_embeddings:
        ours.pop("lm_head.weight", None)
    if ours != theirs:
        diff = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
        raise ResumeError(
            f"{path}: the checkpoint's model has a different shape than the configured one "
            f"({len(diff)} tensors differ, e.g. {diff[0]}: checkpoint {theirs.get(diff[0])}, "
            f"config {ours.get(diff[0])}); resume with the config that started the run"
        )


def plot_loss_curve(metrics_path: Path, png: Path) -> None:
    """Training loss against tokens, with a line at each stage boundary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from quintet.io import atomic_path

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["tokens"] for r in steps], [r["loss"] for r in steps], lw=1)
    previous = None
    for r in steps:
        if previous is not None and r["stage"] != previous["stage"]:
            ax.axvline(previous["tokens"], color="grey", ls="--", lw=1)
            ax.text(previous["tokens"], ax.get_ylim()[1], f" {r['stage']}", va="top", fontsize=8)
        previous = r
    ax.set_xlabel("tokens")
    ax.set_ylabel("training loss")
    ax.set_title("loss by stage")
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)

"""Inputs that used to give a silently wrong result: each is now an error (exit code 2, one line naming the
file and the value) or a warning that says what is wrong. Commands run in-process through `quintet.cli.main`,
the same error boundary as the installed command."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from quintet.cli import build_parser, main
from quintet.data.shards import ShardError, load_index, tokenize_curated
from quintet.data.tokenizer_training import train_tokenizer
from quintet.models.jamba.create import create_model

WORDS = {
    "en": "the cat sat on a mat and the dog ran to the park while birds sang in trees".split(),
    "fi": "kissa istui matolla ja koira juoksi puistoon kun linnut lauloivat puissa".split(),
}


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> str:
    err = err.strip()
    assert code == 2, (code, err)
    assert "Traceback" not in err and "\n" not in err, err
    assert err.startswith("quintet: error: "), err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def _curated(root: Path, sources=("en", "fi"), docs: int = 30) -> Path:
    rng = random.Random(0)
    for source in sources:
        folder = root / "curated" / source
        folder.mkdir(parents=True)
        rows = [
            {"id": f"{source}-{i}", "text": " ".join(rng.choice(WORDS[source]) for _ in range(40))}
            for i in range(docs)
        ]
        (folder / "part-0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "curated"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Shards of en+fi text, their tokenizer, and a jamba-tiny folder with that tokenizer and its size."""
    root = tmp_path_factory.mktemp("silent")
    curated = _curated(root)
    tok = train_tokenizer(curated, root / "tokenizer", vocab_size=300, min_frequency=1)
    index = tokenize_curated(curated, tok, root / "shards", heldout_fraction=0.2)
    vocab = load_index(index)["tokenizer"]["vocab_size"]
    model = root / "model"
    create_model("jamba-tiny", model, seed=0, vocab_size=vocab)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tok.parent / name, model / name)
    return {"root": root, "curated": curated, "tokenizer": tok, "shards": index.parent, "model": model}


def _copy_shards(data: dict[str, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(data["shards"], tmp_path / "shards"))


def _heldout_file(shards: Path, suffix: str) -> Path:
    index = json.loads((shards / "index.json").read_text())
    f = index["sources"]["en"]["heldout"]["files"][0]
    return shards / (f["path"] if suffix == ".bin" else f["boundaries"])


# ------------------------------------------------------------------------------------------- tokenizers
def test_a_much_smaller_tokenizer_in_a_model_folder_warns_with_both_sizes(data, tmp_path, caplog):
    from quintet.tokenizer import load_tokenizer

    folder = tmp_path / "model"
    create_model("jamba-tiny", folder, seed=0)  # vocab_size 1024
    shutil.copyfile(data["tokenizer"], folder / "tokenizer.json")
    small = load_tokenizer(data["tokenizer"].parent).vocab_size
    with caplog.at_level(logging.WARNING, logger="quintet.tokenizer"):
        load_tokenizer(folder, vocab_size=1024)
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert f"holds {small} tokens" in warning and "vocab_size is 1024" in warning, warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="quintet.tokenizer"):
        load_tokenizer(data["model"], vocab_size=small)  # its own tokenizer: no warning
        load_tokenizer(data["model"], vocab_size=small + 64)  # padded to a multiple of 64: no warning
    assert not caplog.records, [r.getMessage() for r in caplog.records]


def test_tokenizer_training_prints_the_size_it_has_and_warns_when_smaller_than_asked(
    data, tmp_path, capsys, caplog
):
    code, out, err = run_cli(
        capsys,
        "data",
        "tokenizer",
        "--data",
        data["curated"],
        "--out",
        tmp_path / "tok",
        "--vocab-size",
        "70000",
    )
    assert code == 0, err
    from quintet.tokenizer import HFTokenizer

    held = HFTokenizer(tmp_path / "tok" / "tokenizer.json").vocab_size
    assert held < 70000 and f"(vocab {held})" in out and "70000" not in out, out
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert f"vocab_size = 70000: the tokenizer has only {held} tokens" in warning, warning


# --------------------------------------------------------------------------------- continued pretraining
def _train_toml(tmp_path: Path, init_from: Path, shards: Path, extra_model: str = "") -> Path:
    config = tmp_path / "train.toml"
    config.write_text(
        f'[model]\ninit_from = "{init_from}"\n{extra_model}'
        f'[data]\nshards = "{shards}"\nseq_len = 16\n'
        "[optim]\nmicro_batch_size = 1\ngrad_accum = 1\n"
        f'[run]\nout_dir = "{tmp_path / "run"}"\nmax_steps = 1\nheldout_tokens = 16\n'
        '[[stages]]\nname = "CAP"\ntokens = 64\nmixture = {en = 1.0, fi = 1.0}\nlr = 1e-3\n'
    )
    return config


def test_continued_pretraining_on_shards_of_another_tokenizer_is_refused(data, tmp_path, capsys):
    other_curated = _curated(tmp_path / "other", sources=("fi", "en"), docs=12)
    other = train_tokenizer(other_curated, tmp_path / "other-tok", vocab_size=280, min_frequency=2)
    shards = tokenize_curated(data["curated"], other, tmp_path / "other-shards").parent
    sha = json.loads((shards / "index.json").read_text())["tokenizer"]["sha256"]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')  # an earlier run
    config = _train_toml(tmp_path, data["model"], shards)
    code, _, err = run_cli(capsys, "train", "lm", config, "--overwrite")
    assert_one_line_error(code, err, str(shards / "index.json"), "another tokenizer", sha[:12])
    assert str(data["model"] / "tokenizer.json") in err
    assert (tmp_path / "run" / "metrics.jsonl").is_file()  # refused before --overwrite deleted anything


def test_continued_pretraining_on_shards_of_its_own_tokenizer_trains(data, tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "lm", _train_toml(tmp_path, data["model"], data["shards"]))
    assert code == 0, err


def test_shards_with_more_tokens_than_the_model_are_refused(data, tmp_path, capsys):
    small = tmp_path / "small"
    create_model("jamba-tiny", small, seed=0, vocab_size=260)
    code, _, err = run_cli(capsys, "train", "lm", _train_toml(tmp_path, small, data["shards"]))
    assert_one_line_error(code, err, "index.json", "vocab_size is 260", "[model].vocab_size")


# ------------------------------------------------------------------------------------- corrupt shards
def test_non_increasing_shard_offsets_are_refused_by_perplexity_and_training(data, tmp_path, capsys):
    shards = _copy_shards(data, tmp_path)
    idx = _heldout_file(shards, ".idx")
    bounds = np.fromfile(idx, dtype="<u8")
    bounds[2] = bounds[1] - 1  # document 1 would end before it starts: silently dropped before
    bounds.tofile(idx)
    code, _, err = run_cli(capsys, "eval", "perplexity", "--model", data["model"], "--data", shards)
    assert_one_line_error(code, err, str(idx), f"offset 2 is {int(bounds[2])}")
    code, _, err = run_cli(capsys, "train", "lm", _train_toml(tmp_path, data["model"], shards))
    assert_one_line_error(code, err, str(idx), "offset 2")


def test_shifted_shard_offsets_are_refused_by_perplexity(data, tmp_path, capsys):
    shards = _copy_shards(data, tmp_path)
    idx = _heldout_file(shards, ".idx")
    bounds = np.fromfile(idx, dtype="<u8")
    bounds[1] += 1  # still increasing, but document 0 now ends inside document 1
    bounds.tofile(idx)
    code, _, err = run_cli(capsys, "eval", "perplexity", "--model", data["model"], "--data", shards)
    assert_one_line_error(code, err, str(idx), "offset 1", "not the end-of-sequence id")


def test_an_out_of_vocabulary_id_is_refused_by_perplexity_and_training(data, tmp_path, capsys):
    shards = _copy_shards(data, tmp_path)
    for split in ("heldout", "train"):
        index = json.loads((shards / "index.json").read_text())
        path = shards / index["sources"]["en"][split]["files"][0]["path"]
        tokens = np.fromfile(path, dtype="<u2")
        tokens[5] = 60000
        tokens.tofile(path)
    vocab = index["tokenizer"]["vocab_size"]
    heldout = _heldout_file(shards, ".bin")
    code, _, err = run_cli(capsys, "eval", "perplexity", "--model", data["model"], "--data", shards)
    assert_one_line_error(code, err, str(heldout), "token 5 is id 60000", f"vocab_size {vocab}")

    from quintet.data.mixture import open_sources

    stream = open_sources(shards)["en"]
    stream.read(6, 10)  # the window after the bad id reads fine
    with pytest.raises(ShardError, match=r"en/train-00000.bin: token 5 is id 60000"):
        stream.read(0, 10)


# ------------------------------------------------------------------------------------------ generation
def test_negative_temperature_is_refused(data, capsys):
    code, _, err = run_cli(
        capsys, "generate", "--model", data["model"], "--prompt", "hi", "--temperature", "-1"
    )
    assert_one_line_error(code, err, "temperature = -1.0", ">= 0")


# -------------------------------------------------------------------------------------------- images
def _write_png16_rgb(path: Path, array: np.ndarray) -> None:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one): IHDR bit depth 16, colour type 2."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    h, w, _ = array.shape
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(h))
    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def test_a_16_bit_grey_png_is_read_at_its_depth_not_clipped(tmp_path):
    from PIL import Image

    from quintet.data.images import ImageLoadError, load_image

    values = np.array([[0, 257, 32768], [40000, 65280, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    image = load_image(tmp_path / "deep.png")
    assert image.shape == (3, 2, 3)
    expected = values.astype(np.float32) / 65535
    for channel in image:
        np.testing.assert_allclose(channel.numpy(), expected, atol=1e-6)
    # the same picture at 8 bits reads the same to within one 8-bit step
    Image.fromarray((values // 257).astype(np.uint8)).save(tmp_path / "eight.png")
    assert float((load_image(tmp_path / "eight.png") - image).abs().max()) <= 1 / 255
    # 16-bit colour: Pillow keeps the high byte of each sample (no clipping to white)
    colour = np.array([[[0, 257, 65535], [40000, 32768, 65280]]], dtype=np.uint16)
    _write_png16_rgb(tmp_path / "colour.png", colour)
    read = load_image(tmp_path / "colour.png").permute(1, 2, 0).numpy() * 255
    np.testing.assert_allclose(read, (colour >> 8).astype(np.float32), atol=1e-4)
    Image.fromarray(np.ones((2, 2), dtype=np.float32)).save(tmp_path / "float.tiff")
    with pytest.raises(ImageLoadError, match="float grey image"):
        load_image(tmp_path / "float.tiff")


# ------------------------------------------------------------------------------------------ model init
def test_model_init_over_a_model_folder_needs_overwrite(data, tmp_path, capsys):
    folder = Path(shutil.copytree(data["model"], tmp_path / "trained"))
    weights = (folder / "model.safetensors").read_bytes()
    code, _, err = run_cli(capsys, "model", "init", "--preset", "jamba-tiny", "--out", folder)
    assert_one_line_error(code, err, str(folder), "tokenizer.json", "--overwrite")
    assert (folder / "model.safetensors").read_bytes() == weights
    code, out, err = run_cli(
        capsys, "model", "init", "--preset", "jamba-tiny", "--out", folder, "--overwrite"
    )
    assert code == 0, err
    assert not (folder / "tokenizer.json").exists()  # no tokenizer of the old model beside the new one
    assert (folder / "model.safetensors").read_bytes() != weights


# ------------------------------------------------------------------------------------------- red team
def _report(empty: int, n: int = 10) -> dict:
    def cell(compliance: int, refusal: int, empty: int) -> dict:
        judged = compliance + refusal + empty
        return {
            "n": judged,
            "error": 0,
            "empty": empty,
            "compliance": compliance,
            "refusal": refusal,
            "unknown": 0,
            "rate": compliance / judged,
        }

    harmful = {"overall": cell(0, n - empty, empty), "by_category": {}, "by_language": {}}
    benign = {"overall": cell(n, 0, 0), "by_category": {}, "by_language": {}}
    model = {"name": "m", "harmful": harmful, "benign": benign}
    return {"models": [model], "judge": "rules", "prompts": {"n": 2 * n, "source": "x"}}


def test_redteam_summary_says_when_the_answers_are_empty():
    from quintet.safety.report import format_comparison

    text = format_comparison(_report(empty=10))
    assert "m: 10 of 20 answers empty (10 of 10 harmful, 0 of 10 benign)" in text
    assert "warning: m: 10 of 10 answers to harmful prompts are empty" in text, text
    assert "warning" not in format_comparison(_report(empty=1))


# --------------------------------------------------------------------------------------------- files
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_are_written_with_the_users_umask(tmp_path, umask):
    import torch
    from safetensors.torch import save_file

    from quintet.io import atomic_path, atomic_write_text

    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        with atomic_path(tmp_path / "w.safetensors") as tmp:
            save_file({"x": torch.zeros(2)}, str(tmp))  # writes a file of its own
    finally:
        os.umask(old)
    for name in ("a.txt", "w.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    assert not list(tmp_path.glob(".*.tmp"))


# ---------------------------------------------------------------------------------------------- help
def _parsers(parser, path=("quintet",)):
    import argparse

    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*path, name))


def test_every_option_says_what_it_does():
    import argparse

    missing = [
        (" ".join(path), action.dest)
        for path, parser in _parsers(build_parser())
        for action in parser._actions
        if not action.help and not isinstance(action, argparse._SubParsersAction)
    ]
    assert not missing, missing


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["data", "tokenizer", "--help"])
    out = capsys.readouterr().out
    assert "(default: 4096)" in out and "(default: 2)" in out, out
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 0.0)" in out and "(default: None)" not in out, out


# ------------------------------------------------------------------------------------------ curation
def test_the_filter_stage_counts_its_documents_for_the_progress_bar(tmp_path):
    from datatrove.data import Document

    from quintet.data.curation.base import DocumentProgress
    from quintet.data.curation.config import load_config
    from quintet.data.curation.pipeline import build_stages, progress_dir

    step = DocumentProgress(str(tmp_path / "progress"), every_s=0.0)
    docs = (Document(text=f"doc {i}", id=str(i)) for i in range(200))
    seen = 0
    for _ in step.run(docs, rank=3):
        seen += 1
        if seen == 130:  # written while the task runs, not only at its end
            assert int((tmp_path / "progress" / "00003").read_text()) == 128
    assert seen == 200 and (tmp_path / "progress" / "00003").read_text() == "200"
    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "curation-demo.toml")
    filter_stage = build_stages(config, tmp_path / "out")[0]
    counters = [s for s in filter_stage.pipeline if isinstance(s, DocumentProgress)]
    assert [c.folder for c in counters] == [str(progress_dir(tmp_path / "out", "filter"))]

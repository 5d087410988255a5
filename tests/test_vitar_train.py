"""Multi-resolution trainer: config validation, schedule, exact resume, MAE mode, deterministic eval."""

from __future__ import annotations

import json

import pytest
import torch

from quintet.data.procedural_images import ProceduralImages
from quintet.eval.vision import evaluate, images_per_batch
from quintet.models.vitar import ConfigError, build_model, load_model, preset_config
from quintet.models.vitar.mae import ViTARForMaskedImageModeling
from quintet.train.vision import (
    VisionTrainConfig,
    VisionTrainer,
    batch_plan,
    learning_rate,
    load_train_config,
    train_vision,
)


def _config(tmp_path, **kw):
    base = dict(
        model="vitar-tiny",
        resolutions=[32, 48],
        steps=6,
        batch_size=4,
        warmup_steps=2,
        out_dir=str(tmp_path / "run"),
        checkpoint_every=3,
        log_every=3,
        progress=False,
        model_overrides={"hidden_size": 32, "num_hidden_layers": 2, "drop_path_rate": 0.1},
    )
    base.update(kw)
    return VisionTrainConfig(**base)


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("mode", "dino", "mode = 'dino'.*supervised, mae"),
        ("resolutions", [], "resolutions = \\[\\]"),
        ("resolutions", [32, -4], "resolutions contains -4"),
        ("resolution_weights", [1.0], "needs 2 non-negative"),
        ("steps", 0, "steps = 0"),
        ("min_lr", 1.0, "min_lr = 1.0: must not exceed lr"),
        ("model", "vitar-xl", "unknown preset 'vitar-xl'"),
        ("model_overrides", {"merger": "max"}, "merger = 'max'"),
    ],
)
def test_train_config_errors_name_field_and_value(tmp_path, field, value, fragment):
    with pytest.raises(ConfigError, match=fragment):
        _config(tmp_path, **{field: value})


def test_mae_needs_vitar(tmp_path):
    with pytest.raises(ConfigError, match="mae"):
        _config(tmp_path, model="vit-tiny", mode="mae", model_overrides={})


def test_toml_config_is_read_and_unknown_keys_named(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        'model = "vitar-tiny"\nresolutions = [32, 64]\nsteps = 10\n[model_overrides]\nmerger = "avgpool"\n'
    )
    config = load_train_config(path)
    assert config.resolutions == [32, 64] and config.model_overrides == {"merger": "avgpool"}
    path.write_text("model = 'vitar-tiny'\nresolution = [32]\n")
    with pytest.raises(ConfigError, match="unknown setting .resolution"):
        load_train_config(path)
    path.write_text("model = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_train_config(path)


def test_learning_rate_warms_up_then_decays_to_min(tmp_path):
    config = _config(tmp_path, steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-5)
    lrs = [learning_rate(s, config) for s in range(100)]
    assert lrs[9] == pytest.approx(1e-3) and lrs[0] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert learning_rate(100, config) == pytest.approx(1e-5)


def test_batch_plan_draws_one_resolution_per_batch_deterministically(tmp_path):
    config = _config(tmp_path, resolutions=[32, 64, 96], steps=300)
    plans = [batch_plan(config, s, None) for s in range(300)]
    assert plans == [batch_plan(config, s, None) for s in range(300)]
    counts = {r: sum(p[0] == r for p in plans) for r in (32, 64, 96)}
    assert all(c > 60 for c in counts.values())
    # a finite folder: each epoch visits every image once
    seen = [i for s in range(5) for i in batch_plan(config, s, 20)[1]]
    assert sorted(seen) == list(range(20))


def test_resume_continues_exactly(tmp_path):
    straight = VisionTrainer(_config(tmp_path / "a"))
    straight_result = straight.run()
    assert straight_result.steps == 6

    VisionTrainer(_config(tmp_path / "b")).run(until=5)  # a crash after step 5: checkpoint at step 3
    resumed = VisionTrainer(_config(tmp_path / "b"))
    assert resumed.resume() and resumed.step == 3
    resumed.run()
    a, b = straight.net.state_dict(), resumed.net.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [h["loss"] for h in straight.history] == [h["loss"] for h in resumed.history]


def test_resume_refuses_a_changed_config(tmp_path):
    VisionTrainer(_config(tmp_path, steps=3)).run()
    with pytest.raises(ConfigError, match="lr: 0.001 -> 0.01"):
        VisionTrainer(_config(tmp_path, steps=3, lr=1e-2)).resume()


def test_train_vision_writes_a_loadable_model_folder(tmp_path):
    config = _config(tmp_path, eval_resolutions=[32, 64], eval_images=8)
    result = train_vision(config)
    model = load_model(result.model_dir)
    assert model.config.labels == ProceduralImages.classes
    summary = json.loads((tmp_path / "run" / "train_result.json").read_text())
    assert [e["resolution"] for e in summary["evaluation"]] == [32, 64]
    assert all(e["flops"] > 0 for e in summary["evaluation"])
    checkpoint = (
        tmp_path / "run" / "checkpoints" / (tmp_path / "run" / "checkpoints" / "latest").read_text().strip()
    )
    files = sorted(p.name for p in checkpoint.iterdir())
    assert files == ["model.safetensors", "optimizer.safetensors", "rng.safetensors", "trainer_state.json"]


def test_mae_mode_trains_backbone_and_decoder_then_initialises_a_classifier(tmp_path):
    config = _config(tmp_path, mode="mae", steps=4, resolutions=[32, 64])
    trainer = VisionTrainer(config)
    assert isinstance(trainer.net, ViTARForMaskedImageModeling)
    before = {k: v.clone() for k, v in trainer.net.state_dict().items()}
    result = trainer.run()
    after = trainer.net.state_dict()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"vitar", "decoder"}
    assert result.final_loss is not None and result.final_loss == result.final_loss
    assert not torch.equal(
        before["vitar.merger.block.attn.q.weight"], after["vitar.merger.block.attn.q.weight"]
    )
    fine = VisionTrainer(_config(tmp_path / "ft", init_from=result.model_dir, steps=1))
    torch.testing.assert_close(fine.model.patch_embed.proj.weight, trainer.model.patch_embed.proj.weight)


def test_evaluation_is_deterministic_and_independent_of_batching():
    torch.manual_seed(0)
    model = build_model(preset_config("vitar-tiny"))
    model.train()  # evaluate must switch fuzzy offsets and drop-path off itself
    data = ProceduralImages(num_images=12, seed=4)
    first = evaluate(model, data, [32, 72], progress=False)
    again = evaluate(model, data, [32, 72], progress=False)
    small_batches = evaluate(model, data, [32, 72], max_tokens=300, progress=False)
    assert images_per_batch(model, 72, 300) == 1
    assert [r.to_dict() for r in first] == [r.to_dict() for r in again]
    assert [r.correct for r in first] == [r.correct for r in small_batches]
    with torch.inference_mode():
        x = data.render(range(4), 72)
        torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)


def test_evaluation_skips_models_over_the_token_budget():
    vit = build_model(preset_config("vit-tiny"))
    data = ProceduralImages(num_images=2)
    results = evaluate({"vit": vit}, data, [32, 128], skip_above_tokens=500, progress=False)["vit"]
    assert results[0].accuracy is not None and results[1].accuracy is None
    assert "1025 encoder tokens" in results[1].skipped


def test_example_configs_are_valid():
    from pathlib import Path

    paths = sorted(Path(__file__).resolve().parents[1].glob("configs/vitar-*.toml"))
    assert paths, "configs/vitar-*.toml missing"
    for path in paths:
        load_train_config(path)


def test_training_on_an_image_folder(tmp_path):
    from quintet.data.procedural_images import write_image_folder

    source = ProceduralImages(seed=11)
    write_image_folder(source, tmp_path / "imgs", range(4), (40, 56))
    config = _config(tmp_path, data=str(tmp_path / "imgs"), steps=2, eval_resolutions=[32], eval_images=4)
    result = train_vision(config)
    model = load_model(result.model_dir)
    assert model.config.labels == sorted({p.parent.name for p in (tmp_path / "imgs").rglob("*.png")})
    assert result.evaluation[0]["total"] == 4

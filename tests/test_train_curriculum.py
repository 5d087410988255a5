"""Curriculum stages, LR schedules and the training config's errors."""

import math

import pytest

from quintet.errors import ConfigError
from quintet.train.curriculum import Curriculum, Stage, aurora_m_stages
from quintet.train.lm_config import TrainConfig


def _base(**over):
    data = {
        "model": {"preset": "jamba-tiny"},
        "data": {"shards": "x", "seq_len": 16},
        "stages": [{"name": "CAP", "tokens": 1000, "mixture": {"en": 1.0, "fi": 1.0}}],
    }
    data.update(over)
    return data


def test_cosine_schedule_shape():
    s = Stage("A", 1000, {"en": 1}, lr=1e-3, min_lr=1e-4, warmup=0.1, schedule="cosine")
    assert s.lr_at(0) == 0.0
    assert math.isclose(s.lr_at(50), 5e-4)
    assert math.isclose(s.lr_at(100), 1e-3)
    assert math.isclose(s.lr_at(550), (1e-3 + 1e-4) / 2)
    assert math.isclose(s.lr_at(1000), 1e-4)
    lrs = [s.lr_at(t) for t in range(100, 1001, 50)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


def test_linear_and_constant_schedules():
    lin = Stage("A", 100, {"en": 1}, lr=1.0, min_lr=0.0, warmup=0.0, schedule="linear")
    assert [lin.lr_at(t) for t in (0, 50, 100)] == [1.0, 0.5, 0.0]
    const = Stage("A", 100, {"en": 1}, lr=0.3, warmup=0.0, schedule="constant")
    assert {const.lr_at(t) for t in range(0, 101, 10)} == {0.3}


def test_aurora_m_preset_splits_the_budget_377_to_58():
    cur = aurora_m_stages(435_000, {"en": 1, "code": 1}, {"en": 1, "safety": 0.1})
    assert [s.name for s in cur.stages] == ["CAP", "CAT"]
    assert [s.tokens for s in cur.stages] == [377_000, 58_000]
    assert cur.total_tokens == 435_000
    assert cur.stages[1].weights == {"en": 1 / 1.1, "safety": 0.1 / 1.1}


@pytest.mark.parametrize(
    "stage, fragment",
    [
        (
            {"name": "A", "tokens": 0, "mixture": {"en": 1}},
            "tokens = 0: the token budget must be a positive integer",
        ),
        ({"name": "A", "tokens": 10, "mixture": {"en": 0}}, "mixture['en'] = 0: weights must be positive"),
        ({"name": "A", "tokens": 10, "mixture": {"en": -1.0}}, "mixture['en'] = -1.0"),
        ({"name": "A", "tokens": 10, "mixture": {}}, "give weights over named sources"),
        ({"name": "A", "tokens": 10, "mixture": {"en": 1}, "schedule": "step"}, "schedule = 'step'"),
        ({"name": "A", "tokens": 10, "mixture": {"en": 1}, "lrr": 1}, "unknown field(s) ['lrr']"),
    ],
)
def test_stage_errors_name_the_stage_field_and_value(stage, fragment):
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict(_base(stages=[stage]), source="train.toml")
    assert "train.toml" in str(err.value) and fragment in str(err.value)


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="exactly one of preset"):
        TrainConfig.from_dict(_base(model={}))
    with pytest.raises(ConfigError, match=r"\[optim\].micro_batch_size = 0"):
        TrainConfig.from_dict(_base(optim={"micro_batch_size": 0}))
    with pytest.raises(ConfigError, match=r"\[run\].precision = 'fp8'"):
        TrainConfig.from_dict(_base(run={"precision": "fp8"}))
    with pytest.raises(ConfigError, match=r"unknown section\(s\) \['optimizer'\]"):
        TrainConfig.from_dict(_base(optimizer={}))
    with pytest.raises(ConfigError, match="stage names must be unique"):
        Curriculum([Stage("A", 1, {"en": 1}), Stage("A", 1, {"en": 1})])
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\npreset = 1")
    with pytest.raises(ConfigError, match="bad.toml: not valid TOML"):
        TrainConfig.from_file(bad)


def test_aurora_m_curriculum_from_toml(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text(
        '[model]\npreset = "jamba-tiny"\n[data]\nshards = "s"\nseq_len = 32\n'
        '[curriculum]\npreset = "aurora-m"\ntotal_tokens = 8700\n'
        "cap_mixture = { en = 1.0, code = 1.0 }\ncat_mixture = { en = 1.0, instructions = 0.5 }\n"
    )
    cfg = TrainConfig.from_file(path)
    assert [s.tokens for s in cfg.curriculum.stages] == [7540, 1160]

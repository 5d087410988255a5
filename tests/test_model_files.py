"""Files that travel with a model: copied by every stage; the chat template read as transformers 5 does."""

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from quintet.deploy.convert import quantize_folder
from quintet.io import MODEL_FILES, copy_model_files
from quintet.models.jamba import JambaConfig, JambaForCausalLM
from quintet.tokenizer import load_tokenizer

# Not quintet's plain template: a system line, a loop with a filter, special tokens from the config.
CUSTOM_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}[SYS] {{ m['content'] | trim }}\n"
    "{% else %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
MESSAGES = [
    {"role": "system", "content": "  Be brief.  "},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3 + 3?"},
]


@pytest.fixture(scope="module")
def hf_tokenizer_folder(tmp_path_factory):
    """A tokenizer saved by transformers 5 with a custom chat template (written as chat_template.jinja)."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("hf_tok")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog " * 20], trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.chat_template = CUSTOM_TEMPLATE
    fast.save_pretrained(folder)
    return folder, fast


def test_chat_template_jinja_is_read_and_renders_as_transformers(hf_tokenizer_folder):
    folder, fast = hf_tokenizer_folder
    assert (folder / "chat_template.jinja").is_file()  # transformers 5's layout
    assert "chat_template" not in json.loads((folder / "tokenizer_config.json").read_text())
    ours = load_tokenizer(folder)
    assert ours.chat_template == CUSTOM_TEMPLATE
    want = fast.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert ours.render_chat_text(MESSAGES) == want
    assert ours.render_chat_prompt(MESSAGES) == ours.encode(want)


def test_the_template_travels_to_the_fp4_folder(hf_tokenizer_folder, tmp_path):
    folder, fast = hf_tokenizer_folder
    torch.manual_seed(0)
    config = JambaConfig.from_preset("jamba-tiny", vocab_size=320)
    JambaForCausalLM(config).save_pretrained(tmp_path / "float")
    for name in MODEL_FILES:
        if (folder / name).is_file() and not (tmp_path / "float" / name).exists():
            (tmp_path / "float" / name).write_bytes((folder / name).read_bytes())
    quantize_folder(tmp_path / "float", tmp_path / "fp4", group_size=32)
    carried = [name for name in MODEL_FILES if (tmp_path / "float" / name).is_file()]
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= set(carried)
    for name in carried:
        assert (tmp_path / "fp4" / name).is_file(), name
    want = fast.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert load_tokenizer(tmp_path / "fp4").render_chat_text(MESSAGES) == want


def test_copy_keeps_the_writers_own_files(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "dst").mkdir()
    (tmp_path / "src" / "tokenizer_config.json").write_text("{}")
    (tmp_path / "src" / "generation_config.json").write_text('{"from": "source"}')
    (tmp_path / "dst" / "generation_config.json").write_text('{"from": "writer"}')
    assert copy_model_files(tmp_path / "src", tmp_path / "dst") == ["tokenizer_config.json"]
    assert json.loads((tmp_path / "dst" / "generation_config.json").read_text()) == {"from": "writer"}


def test_broken_template_or_config_is_named(hf_tokenizer_folder, tmp_path):
    folder, _ = hf_tokenizer_folder
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }")
    with pytest.raises(ValueError, match=r"chat_template\.jinja: the chat template does not compile"):
        load_tokenizer(tmp_path)
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "tokenizer_config.json").write_text('{"chat_template": ')
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: not valid JSON"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(
        ValueError, match=r"tokenizer\.json: missing, while the folder has tokenizer_config\.json"
    ):
        load_tokenizer(tmp_path)


def test_the_template_travels_through_train_align_and_quantize(hf_tokenizer_folder, tmp_path):
    """The copies each stage makes of a model folder's files (train: from the shards' tokenizer; align:
    from its starting model; quantize: from the float folder), chained: the template is intact at the end."""
    from quintet.align.run import _save
    from quintet.train.lm import copy_tokenizer_files

    folder, fast = hf_tokenizer_folder
    torch.manual_seed(0)
    model = JambaForCausalLM(JambaConfig.from_preset("jamba-tiny", vocab_size=320))
    model.save_pretrained(tmp_path / "pretrained")
    copy_tokenizer_files(str(folder), tmp_path / "pretrained")  # train: the shards' tokenizer folder
    aligned = _save(model, str(tmp_path / "pretrained"), tmp_path / "align")  # align
    quantize_folder(aligned, tmp_path / "fp4", group_size=32)  # deploy quantize
    want = fast.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    for stage in (tmp_path / "pretrained", aligned, tmp_path / "fp4"):
        assert load_tokenizer(stage).render_chat_text(MESSAGES) == want, stage

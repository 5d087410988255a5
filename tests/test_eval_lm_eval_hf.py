"""`max_length` means what it means in lm-eval's own `hf` backend: HFLM on transformers' JambaForCausalLM
and a transformers tokenizer, and quintet's adapter / `loglikelihoods` / `text_nll` on the same folder,
give the same number request by request where truncation and rolling windows happen (contexts longer
than max_length, texts several windows long). Counting the scored token in max_length (quintet's old
meaning) feeds one token less and cuts other windows: these comparisons fail by far more than 1e-5."""

import os

import pytest
import torch
import transformers
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from quintet.data.tokenizer_training import train_tokenizer
from quintet.eval.lm_eval_adapter import QuintetLM
from quintet.eval.multiple_choice import loglikelihoods
from quintet.eval.perplexity import text_nll
from quintet.models.jamba import JambaConfig, JambaForCausalLM

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CORPUS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Helsinki is the capital of Finland, and Tampere is its third largest city.",
    "Suomen pääkaupunki on Helsinki; Turku oli pääkaupunki ennen vuotta 1812.",
    "A model reads tokens, one after another, and predicts the next one from the ones before it.",
    "Numbers such as 2026, 3.14159 and 42 are spelled digit by digit by this tokenizer.",
]
LONG = " ".join(CORPUS * 3)  # several hundred tokens: longer than every max_length below
REQUESTS = [
    (LONG, " Helsinki"),
    (LONG + " The capital of Finland is", " Helsinki, of course."),
    (LONG + " Numbers such as ", "2026 and 42"),  # the context's trailing space moves to the continuation
    ("The capital of Finland is", " Turku"),  # short: no truncation
    ("", "Helsinki is the capital of Finland."),  # empty context: the prefix token
]
TEXTS = [LONG, LONG[: len(LONG) // 3], "Hello, world.", CORPUS[2] * 5]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A jamba-tiny folder with a trained tokenizer.json, read by quintet and by transformers."""
    root = tmp_path_factory.mktemp("hf_parity") / "model"
    path = train_tokenizer(CORPUS * 4, root, vocab_size=400, min_frequency=1)
    vocab = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path)).vocab_size
    torch.manual_seed(0)
    # Larger weights than the default init make every token's distribution depend on its context.
    model = JambaForCausalLM(JambaConfig.from_preset("jamba-tiny", vocab_size=vocab, initializer_range=0.1))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def theirs(folder):
    """lm-eval's hf backend: a function max_length -> HFLM (transformers model and tokenizer)."""
    model = transformers.JambaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    assert isinstance(tokenizer, transformers.PreTrainedTokenizerFast)

    def make(max_length: int) -> HFLM:
        return HFLM(pretrained=model, tokenizer=tokenizer, max_length=max_length, batch_size=3, device="cpu")

    return make


def both(folder, theirs, max_length):
    hf = theirs(max_length)
    ours = QuintetLM(pretrained=str(folder), batch_size=2, max_length=max_length)
    assert hf.prefix_token_id == 1 == ours.model.config.bos_token_id
    for ctx, cont in REQUESTS:  # same tokens on both sides
        assert hf.tok_encode(ctx + cont) == ours.tok.encode(ctx + cont)
    assert len(ours.tok.encode(LONG)) > 4 * max_length  # truncation and several rolling windows happen
    return hf, ours


@pytest.mark.parametrize("max_length", [64, 23])
def test_truncated_loglikelihoods_equal_lm_eval_hf(folder, theirs, max_length):
    hf, ours = both(folder, theirs, max_length)
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(REQUESTS)]
    expected = hf.loglikelihood(requests, disable_tqdm=True)
    got = ours.loglikelihood(requests, disable_tqdm=True)
    direct = loglikelihoods(ours.model, ours.tok, REQUESTS, max_length=max_length)
    for want, mine, plain in zip(expected, got, direct, strict=True):
        assert mine[0] == pytest.approx(want[0], rel=1e-5) and mine[1] == want[1]
        assert plain == mine


@pytest.mark.parametrize("max_length", [64, 23])
def test_rolling_loglikelihoods_equal_lm_eval_hf(folder, theirs, max_length):
    hf, ours = both(folder, theirs, max_length)
    rolling = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(TEXTS)]
    expected = hf.loglikelihood_rolling(rolling, disable_tqdm=True)
    got = ours.loglikelihood_rolling(rolling, disable_tqdm=True)
    nll = [-n for n, _ in text_nll(ours.model, ours.tok, TEXTS, max_length=max_length)]
    assert got == pytest.approx(expected, rel=1e-5)
    assert nll == pytest.approx(got, rel=1e-12)

"""Generation: greedy, sampling, stop tokens, streaming, filters, and bad prompts."""

import pytest
import torch

from quintet.generation import GenerationConfig, filter_logits, generate, stream_generate, stream_text
from quintet.models.jamba import JambaConfig, JambaForCausalLM
from quintet.tokenizer import ByteTokenizer, StreamDecoder


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = JambaForCausalLM(JambaConfig.from_preset("jamba-tiny", initializer_range=0.2)).eval()
    return m


def test_greedy_equals_argmax_of_full_forward(model):
    prompt = [5, 9, 200, 31]
    out = generate(model, [prompt], max_new_tokens=10, stop_token_ids=())[0]
    seq = list(prompt)
    for _ in range(10):
        with torch.no_grad():
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    assert out == seq[len(prompt) :]


def test_sampling_is_reproducible_by_seed_and_varies_without(model):
    kw = dict(max_new_tokens=20, do_sample=True, temperature=1.5, stop_token_ids=())
    a = generate(model, [[4, 5, 6]], seed=3, **kw)
    assert a == generate(model, [[4, 5, 6]], seed=3, **kw)
    assert a != generate(model, [[4, 5, 6]], seed=4, **kw)


def test_stop_token_ends_a_row_and_is_not_returned(model):
    free = generate(model, [[7, 8, 9]], max_new_tokens=12, stop_token_ids=())[0]
    stop = free[5]
    first = free.index(stop)
    assert generate(model, [[7, 8, 9]], max_new_tokens=12, stop_token_ids=(stop,))[0] == free[:first]


def test_stream_yields_same_tokens_as_generate(model):
    prompts = [[3, 4], [10, 11, 12, 13]]
    streamed = [[], []]
    for step in stream_generate(model, prompts, GenerationConfig(max_new_tokens=8, stop_token_ids=())):
        assert len(step) == 2
        for i, tok in enumerate(step):
            if tok is not None:
                streamed[i].append(tok)
    assert streamed == generate(model, prompts, max_new_tokens=8, stop_token_ids=())


def test_stream_text_only_produces_tokenizer_ids(model):
    text = "".join(stream_text(model, ByteTokenizer(), "héllo", max_new_tokens=16, stop_token_ids=()))
    ids = generate(
        model, [ByteTokenizer().encode("héllo")], max_new_tokens=16, stop_token_ids=(), vocab_limit=259
    )
    assert text == ByteTokenizer().decode(ids[0])


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.6)).tolist() == [[False, False, True, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.5)).tolist() == [[False, True, True, True, True]]
    assert not torch.isinf(filter_logits(logits, top_p=1.0)).any()


def test_stream_decoder_holds_back_partial_utf8():
    tok = ByteTokenizer()
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in tok.encode("é!")]
    assert pieces == ["", "é", "!"]


def test_empty_prompt_and_out_of_vocab_ids_are_clear_errors(model):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[4], []])
    with pytest.raises(ValueError, match=r"prompt 0: token id 1024 is outside the vocabulary \[0, 1024\)"):
        generate(model, [[4, 1024]])
    with pytest.raises(ValueError, match="prompt: empty text"):
        next(stream_text(model, ByteTokenizer(), ""))
    with pytest.raises(ValueError, match=r"input_ids\[0, 2\] = 5000: token ids must be in \[0, 1024\)"):
        model(torch.tensor([[1, 2, 5000]]))
    with pytest.raises(ValueError, match="empty input"):
        model(torch.zeros(1, 0, dtype=torch.long))


def test_generation_config_validation():
    with pytest.raises(ValueError, match="top_p = 0: must be in"):
        GenerationConfig(top_p=0)
    with pytest.raises(ValueError, match="temperature = 0: must be > 0 when sampling"):
        GenerationConfig(do_sample=True, temperature=0)
    with pytest.raises(ValueError, match="max_new_tokens = -1"):
        GenerationConfig(max_new_tokens=-1)


def test_chunked_prefill_gives_the_same_tokens_for_a_padded_batch(model):
    prompts = [list(range(3, 40)), list(range(50, 61)), [9]]
    one_shot = generate(model, prompts, max_new_tokens=10, stop_token_ids=(), prefill_chunk_size=4096)
    chunked = generate(model, prompts, max_new_tokens=10, stop_token_ids=(), prefill_chunk_size=6)
    assert chunked == one_shot


def test_argmax_last_picks_the_first_maximum_as_torch_does():
    from quintet.generation import argmax_last

    torch.manual_seed(0)
    for scores in (torch.randn(32768), torch.randn(3, 100), torch.tensor([[1.0, 7.0, 7.0, 2.0]])):
        assert torch.equal(argmax_last(scores), scores.argmax(-1))
    assert int(argmax_last(torch.tensor([2.0, 5.0, 5.0]))) == 1

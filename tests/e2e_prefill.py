"""The prefill process of the end-to-end tests (spawned): load SmolLM2, then for each
request received on the pipe run a streaming prefill through kvwire and reply with the
first generated token and the transfer statistics."""

import time

import torch


def prefill_process(pipe, address, secret: str, codec: str, num_blocks: int) -> None:
    import kvwire
    from kvwire.bench.models import smollm2
    from kvwire.integrations.transformers import layout_for, prefill

    torch.set_num_threads(1)
    _, model = smollm2()
    layout = layout_for(model.config, block_size=16)
    pool = layout.allocate(num_blocks)
    with kvwire.Sender(layout, address, secret=secret, kv_caches=pool, codec=codec, streams=2) as tx:
        pipe.send("ready")
        while True:
            job = pipe.recv()
            if job is None:
                break
            request_id, prompt, block_ids, start, mode = job
            ids = torch.tensor([prompt])
            t = tx.transfer(request_id, block_ids, len(prompt) - start, deadline=300)
            t0 = time.monotonic()
            first = prefill(model, ids, t, pool, start, stream=mode == "stream")
            forward_end = time.monotonic()
            if mode == "after":  # the baseline: send every layer once the forward pass is over
                for i in range(layout.num_layers):
                    t.send_layer(i)
            stats = t.finish()
            done = time.monotonic()
            pipe.send({"first": int(first), "stats": stats, "forward_s": forward_end - t0,
                       "after_forward_s": done - forward_end})  # fmt: skip

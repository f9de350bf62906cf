"""LLM stage layer overhead.

1. Saturation: a local OpenAI-compatible server whose answers take a random 50-500 ms (seeded) and
   a 2,000-request ``generate`` stage (library call, no cache) on the ``openai`` engine at
   concurrency 64 (``--requests 10000 --concurrency 512`` for the large case). The ideal is the
   concurrency bound, concurrency / mean latency requests/s (mean of the latencies the server
   actually served). Target: >= 90% of it. The peer, a bare aiohttp client (one session, no stage,
   no engine; the same kind of event loop as the engine, uvloop's where installed; warmed up and
   with the garbage collector paced as the stage's), then sends the same number of requests to
   the same server: its ratio is what the machine allows a client
   at all, and "stage / peer" is the stage's own cost.
2. Transformers engine: the same prompts through the ``generate`` stage and through the engine
   called directly (greedy, same tokens). Target: stage >= 0.95x direct.

    python benchmarks/llm_stage.py [--requests 2000] [--concurrency 64] [--prompts 16] [--max-tokens 16]
"""

from __future__ import annotations

import argparse
import os
import random
import time

import pyarrow as pa

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def serve(port_box, low: float, high: float, seed: int) -> None:
    """A minimal asyncio HTTP/1.1 server (keep-alive) answering chat completions after a random
    latency; run in its own process, as a real inference server would be."""
    import asyncio

    from curate.testing.fake_openai import chat_response, read_request

    rng = random.Random(seed)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                _, body = await read_request(reader)
                await asyncio.sleep(rng.uniform(low, high))
                writer.write(chat_response(body, body["messages"][-1]["content"][::-1]))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=512)
        port_box.put(server.sockets[0].getsockname()[1])
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def latencies(n: int, low: float, high: float, seed: int) -> list[float]:
    """The latencies the server draws for its first ``n`` requests (same generator, same order)."""
    rng = random.Random(seed)
    return [rng.uniform(low, high) for _ in range(n)]


def table(n: int) -> pa.Table:
    return pa.table({"id": [f"d{i}" for i in range(n)], "text": [f"Explain item {i} briefly." for i in range(n)]})


def bench_saturation(n: int, concurrency: int, batch_size: int | None = None) -> None:
    from curate.stages.synth.generate import Generate

    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    box = ctx.Queue()
    proc = ctx.Process(target=serve, args=(box, 0.05, 0.5, 0), daemon=True)
    proc.start()
    base_url = f"http://127.0.0.1:{box.get(timeout=60)}/v1"
    try:
        batch = {"batch_size": batch_size} if batch_size else {}  # default: the stage's own (64)
        stage = Generate(engine={"kind": "openai", "model": "m", "base_url": base_url,
                                 "concurrency": concurrency, "timeout": 30},
                         cache=False, max_tokens=16, min_requests=n + 1, **batch)
        stage.ensure_setup()
        stage(table(concurrency))  # warm-up: first-time imports of the HTTP stack (not counted)
        t0, c0 = time.perf_counter(), time.process_time()
        out = stage(table(n))
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        # the peer: a bare aiohttp client (no stage, no engine) on the same server, right after
        raw_dt, raw_cpu = raw_client(base_url, n, concurrency)
    finally:
        proc.terminate()
        proc.join(10)
    ok = sum(1 for f in out.column("completion_finish_reason").to_pylist() if f == "stop")
    lat = latencies(concurrency + n, 0.05, 0.5, 0)[concurrency:]  # the server's draws after the warm-up
    mean = sum(lat) / len(lat)
    ideal = concurrency / mean
    got = n / dt
    print(f"openai engine through the stage ({loop_name()} loop): {n} requests, concurrency {concurrency}, batch_size "
          f"{stage.config.batch_size}, latency 50-500 ms (mean {mean * 1000:.0f} ms), {ok} answered; "
          f"client CPU {cpu * 1000 / n:.2f} ms per request (load average {os.getloadavg()[0]:.1f})")
    print(f"  stage: {got:8.1f} req/s   ideal {concurrency}/mean latency: {ideal:8.1f} req/s   "
          f"ratio {got / ideal:.3f} (target >= 0.90)")
    # what a client with zero overhead reaches on the same latencies (the end of the run has fewer
    # than 64 requests in flight): the ratio above cannot exceed this one
    import heapq

    slots = [0.0] * concurrency
    for x in lat:
        heapq.heappush(slots, heapq.heappop(slots) + x)
    print(f"  (a zero-overhead client on the same latencies: {n / max(slots):8.1f} req/s, "
          f"ratio {n / max(slots) / ideal:.3f})")
    # the server's draws after the stage's and the peer's warm-up
    raw_lat = latencies(2 * concurrency + 2 * n, 0.05, 0.5, 0)[2 * concurrency + n:]
    raw_ideal = concurrency / (sum(raw_lat) / len(raw_lat))
    print(f"  peer, a bare aiohttp client on a {loop_name()} loop (same server, warmed up the same way, next {n} requests): {n / raw_dt:8.1f} req/s, ratio "
          f"{n / raw_dt / raw_ideal:.3f}, client CPU {raw_cpu * 1000 / n:.2f} ms per request; "
          f"stage / peer: {(got / ideal) / (n / raw_dt / raw_ideal):.2f}")


def loop_name() -> str:
    from curate.engines.openai_engine import new_event_loop

    loop = new_event_loop()
    loop.close()
    return type(loop).__module__.split(".")[0]


def raw_client(base_url: str, n: int, concurrency: int) -> tuple[float, float]:
    """Seconds and CPU seconds of ``n`` chat requests from one aiohttp session at ``concurrency``, on
    the same kind of event loop as the engine's, with the garbage collector paced as for a stage."""
    import asyncio

    import aiohttp

    async def go() -> tuple[float, float]:
        conn = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=60)) as cl:
            sem = asyncio.Semaphore(concurrency)

            async def one(i: int) -> None:
                body = {"model": "m", "messages": [{"role": "user", "content": f"Explain item {i} briefly."}],
                        "max_tokens": 16}
                async with sem:
                    async with cl.post(base_url + "/chat/completions", json=body) as r:
                        await r.json()

            # warm-up, as the stage had: the connections open before the clock starts (not counted)
            await asyncio.gather(*(one(i) for i in range(concurrency)))
            t0, c0 = time.perf_counter(), time.process_time()
            await asyncio.gather(*(one(i) for i in range(n)))
            return time.perf_counter() - t0, time.process_time() - c0

    from curate.engines.openai_engine import new_event_loop
    from curate.llm.gcpace import paced

    loop = new_event_loop()  # the loop the engine runs on (uvloop's where installed)
    try:
        with paced():  # the collector paced as it is for a stage's stream
            return loop.run_until_complete(go())
    finally:
        loop.close()


def bench_transformers(prompts: int, max_tokens: int, repeat: int) -> None:
    from curate.engines import Request
    from curate.stages.synth.generate import Generate

    tab = table(prompts)
    stage = Generate(engine={"kind": "transformers", "num_threads": 1}, template="{text}", max_tokens=max_tokens,
                     cache=False, batch_size=prompts)
    stage.ensure_setup()
    engine = stage.engine.shared  # the loaded engine, called directly below
    reqs = [Request(messages=[{"role": "user", "content": t}], params=stage.params)
            for t in tab.column("text").to_pylist()]
    engine.generate(reqs[:2])  # warm-up
    best_stage = best_direct = float("inf")
    tokens = 0
    for _ in range(repeat):  # alternate, keep the best of each (the machine is shared)
        t0 = time.perf_counter()
        direct = engine.generate(reqs)
        best_direct = min(best_direct, time.perf_counter() - t0)
        t0 = time.perf_counter()
        out = stage(tab)
        best_stage = min(best_stage, time.perf_counter() - t0)
        tokens = sum(c.completion_tokens for c in direct)
        assert out.column("completion").to_pylist() == [c.text for c in direct], "stage and engine differ"
    s, d = tokens / best_stage, tokens / best_direct
    print(f"transformers engine (SmolLM2-135M, CPU, 1 thread): {prompts} prompts x {max_tokens} tokens, same outputs")
    print(f"  stage: {s:8.1f} tok/s   engine directly: {d:8.1f} tok/s   ratio {s / d:.3f} (target >= 0.95)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=None, help="the stage's batch_size (default: its own)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--skip-transformers", action="store_true")
    args = ap.parse_args()
    bench_saturation(args.requests, args.concurrency, args.batch_size)
    if not args.skip_transformers:
        bench_transformers(args.prompts, args.max_tokens, args.repeat)


if __name__ == "__main__":
    main()

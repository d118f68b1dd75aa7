"""Swapping registry versions under load: does anyone notice?

`tunelab serve registry:tweets@production builtin:smollm2-135m-instruct` (the alias polled every 0.5 s) serves the
fine-tuned MiniLM sentiment classifier from a registry, and SmolLM2-135M-Instruct for generation. Load, loopback:
- classification at a fixed rate (`--rate`, default 10 requests/s, one tweet each, open loop: a request is sent on
  schedule whether or not the earlier ones have been answered);
- 4 clients streaming SmolLM2 chat answers (64 tokens) back to back.
After a warm-up and a steady window, the alias is moved 5 times (promote, rollback, promote, ...) between two
versions (`--v1`, `--v2`: two fine-tuned MiniLM model dirs). A swap window runs from the move to one second after
the server names the new version on /v1/models. Reported: failed requests (any status but 200, a stream without
its end), classification latency p50/p99 in the steady window and in the swap windows, and how long each swap took.
Target: 0 failed requests; swap-window p99 ≤ 2 × steady p99.

Run alone (2 cores): `python benchmarks/hot_swap.py` (~3 min) -> benchmarks/results/hot_swap.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_result  # noqa: E402
from serve_load import Server, prompts, summary, tweets  # noqa: E402

from tunelab.registry import Registry  # noqa: E402

NAME, GENERATOR = "tweets", "smollm2-135m-instruct"


async def classify_at_rate(url: str, texts: list[str], rate: float, stop: asyncio.Event, out: list) -> None:
    """One request every 1/rate s until `stop`; each answer as (start, latency, status, version)."""
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64)) as client:
        async def one(text: str) -> None:
            start = time.perf_counter()
            try:
                r = await client.post(url + "/v1/classify", json={"model": NAME, "input": text})
                out.append((start, time.perf_counter() - start, r.status_code, r.headers.get("x-tunelab-version")))
            except httpx.HTTPError as err:
                out.append((start, time.perf_counter() - start, type(err).__name__, None))

        tasks, i, t0 = [], 0, time.perf_counter()
        while not stop.is_set():
            tasks.append(asyncio.create_task(one(texts[i % len(texts)])))
            i += 1
            await asyncio.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
        await asyncio.gather(*tasks)


async def stream_chats(url: str, convs: list, stop: asyncio.Event, out: list) -> None:
    """Stream chat answers back to back until `stop`; each as (ok, tokens, seconds)."""
    async with httpx.AsyncClient(timeout=300) as client:
        i = 0
        while not stop.is_set():
            start, chunks, done, status = time.perf_counter(), 0, False, None
            try:
                async with client.stream("POST", url + "/v1/chat/completions", json={
                        "model": GENERATOR, "messages": convs[i % len(convs)], "max_tokens": 64, "stream": True,
                        "temperature": 0}) as r:
                    status = r.status_code
                    async for line in r.aiter_lines():
                        if line == "data: [DONE]":
                            done = True
                        elif line.startswith("data: ") and '"error"' in line:
                            done = False
                            break
                        elif line.startswith("data: "):
                            chunks += 1
            except httpx.HTTPError:
                pass
            out.append((status == 200 and done, chunks, time.perf_counter() - start))
            i += 1


async def run(url: str, registry: Path, versions: list[str], rate: float, warmup: float, steady: float,
              swaps: int, gap: float) -> dict:
    texts, convs = tweets(2000), prompts(16)
    stop, classified, streamed = asyncio.Event(), [], []
    load = [asyncio.create_task(classify_at_rate(url, texts, rate, stop, classified))]
    load += [asyncio.create_task(stream_chats(url, convs, stop, streamed)) for _ in range(4)]
    await asyncio.sleep(warmup)
    steady_window = (time.perf_counter(), time.perf_counter() + steady)
    await asyncio.sleep(steady)
    windows, took = [], []
    async with httpx.AsyncClient(timeout=30) as client:
        for k in range(swaps):
            target = versions[(k + 1) % 2]

            def move() -> None:
                with Registry(registry) as reg:
                    if k % 2 == 0:
                        reg.promote(f"{NAME}:{target}", "production", f"hot-swap benchmark, move {k + 1}")
                    else:
                        reg.rollback(NAME, "production", f"hot-swap benchmark, move {k + 1}")

            moved = time.perf_counter()
            await asyncio.to_thread(move)
            while (await client.get(url + f"/v1/models/{NAME}")).json().get("tunelab_version") != \
                    f"{NAME}:{target[:12]}":
                if time.perf_counter() - moved > 120:
                    raise SystemExit(f"the server did not swap to {target[:12]} within 120 s")
                await asyncio.sleep(0.05)
            answering = time.perf_counter()
            took.append(round(answering - moved, 2))
            windows.append((moved, answering + 1.0))
            await asyncio.sleep(max(0.0, moved + gap - time.perf_counter()))
    await asyncio.sleep(2)
    stop.set()
    await asyncio.gather(*load)

    def latencies(inside) -> list[float]:
        return [lat for start, lat, status, _ in classified if status == 200 and inside(start)]

    steady_lat = latencies(lambda t: steady_window[0] <= t < steady_window[1])
    swap_lat = latencies(lambda t: any(a <= t < b for a, b in windows))
    failed = [c for c in classified if c[2] != 200]
    failed_streams = [s for s in streamed if not s[0]]
    seen = {c[3] for c in classified if c[2] == 200}
    ratio = summary(swap_lat)["p99"] / summary(steady_lat)["p99"]
    return {"classify_requests": len(classified), "classify_failed": len(failed),
            "classify_failures": [str(c[2]) for c in failed[:10]], "streams": len(streamed),
            "streams_failed": len(failed_streams),
            "stream_tokens_per_s": round(sum(s[1] for s in streamed) / max(1e-9, sum(s[2] for s in streamed)) * 4,
                                         1),
            "steady": {"requests": len(steady_lat), **summary(steady_lat)},
            "swap_windows": {"requests": len(swap_lat), **summary(swap_lat)},
            "p99_ratio": round(ratio, 2), "swap_seconds": took, "versions_answering": sorted(v for v in seen if v),
            "meets_target": not failed and not failed_streams and ratio <= 2.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--v1", default="runs/tweets-minilm/model", help="a fine-tuned MiniLM classifier model dir")
    ap.add_argument("--v2", default="runs/dapt-then-classify/model",
                    help="another (default: the DAPT example's; a relabelled copy of --v1 when it is missing)")
    ap.add_argument("--rate", type=float, default=10.0, help="classification requests per second")
    ap.add_argument("--warmup", type=float, default=10.0)
    ap.add_argument("--steady", type=float, default=30.0)
    ap.add_argument("--swaps", type=int, default=5)
    ap.add_argument("--gap", type=float, default=10.0, help="seconds from one move to the next")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="tunelab-hot-swap-") as tmp:
        tmp = Path(tmp)
        v2 = Path(args.v2)
        if not v2.is_dir():  # the same weights under another version id: the load and swap cost the same
            v2 = tmp / "v2"
            shutil.copytree(args.v1, v2)
            meta = json.loads((v2 / "tunelab.json").read_text())
            (v2 / "tunelab.json").write_text(json.dumps({**meta, "note": "a second version"}))
        with Registry(tmp / "registry") as reg:
            versions = [reg.register(d, NAME)["version"] for d in (Path(args.v1), v2)]
            reg.promote(f"{NAME}:{versions[0]}", "production", "hot-swap benchmark, start")
        server = Server([f"registry:{NAME}@production", f"builtin:{GENERATOR}", "--registry", str(tmp / "registry"),
                         "--registry-poll", "0.5", "--embedding-model", "none"], tmp / "serve.log")
        try:
            result = asyncio.run(run(server.url, tmp / "registry", versions, args.rate, args.warmup, args.steady,
                                     args.swaps, args.gap))
        finally:
            server.stop()
            log = (tmp / "serve.log").read_text()
        result["server_log_swaps"] = [line.split(": ", 1)[-1] for line in log.splitlines() if "now answers" in line]
    payload = {"load": {"classify_rate_per_s": args.rate, "streams": 4, "stream_tokens": 64},
               "windows_s": {"warmup": args.warmup, "steady": args.steady, "swap_gap": args.gap},
               "v1": str(args.v1), "v2": str(args.v2 if Path(args.v2).is_dir() else "a relabelled copy of v1"),
               **result}
    print(json.dumps(payload, indent=2))
    print("wrote", write_result("hot_swap", payload))


if __name__ == "__main__":
    main()

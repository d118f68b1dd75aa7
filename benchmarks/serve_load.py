"""Serving under load, side by side, loopback only, bounded request counts.

Generation (SmolLM2-135M-Instruct, greedy, 64 new tokens per request):
1. the naive server: the same requests answered one by one with `model.generate` (in this process, no HTTP
   — the anchor pays no server overhead); when 16 arrive at once, request i waits for the i-1 before it;
2. `tunelab serve`: 16 concurrent streaming clients (two rounds), continuous batching;
then a fixed-rate run (bounded count) for failures, latency percentiles and the server's memory before/after.
Reported: generated tokens/s, time-to-first-token and end-to-end p50/p99, and whether every served answer
equals the naive greedy answer.

Engines (the same chat requests, greedy, 64 new tokens): `tunelab serve` with its PyTorch engine on the model,
`tunelab serve` with its llama.cpp engine on the model's Q8_0 GGUF export, and bare llama.cpp (`xllamacpp`, in
this process, no HTTP) on the same file with the same slots and threads — one client at a time (single-stream
tokens/s) and 16 concurrent clients.

Classification (MiniLM-L6 with a 3-label head, real tweets, one text per request, 32 concurrent clients):
`tunelab serve` with micro-batching (up to 64 texts or 5 ms) vs the same server with batches of one
(`--encoder-batch 1 --encoder-wait-ms 0`, one forward per request), and the model's int8 ONNX export served by
ONNX Runtime behind the same micro-batching. Reported: requests/s, p50/p99 latency.

Precision (SmolLM2, greedy, 64 new tokens): `tunelab serve --precision fp32` vs `--precision bf16`, one client at a
time (single-stream tokens/s) and 16 concurrent clients, how many greedy answers are the same; and how far bf16
moves the model from fp32, teacher-forced on real English and Chinese sentences (`serve.precision.bf16_agreement`: top-1
agreement, max and mean |Δlogprob| of the target token). The generation and engines parts above pin
`--precision fp32`: their anchors (`model.generate`, the answers compared word for word) are fp32.

Batching (SmolLM2 in this process, the server's default precision in both arms, `max_batch` 16): continuous vs
static batching (`GenerationEngine(batching=…)`) on the same seeded mixed trace (`_trace.py`: Poisson arrivals,
log-uniform prompt lengths 16–512 and output lengths 8–256 tokens, prompts cut from real tweets; 48 requests at 3
per second, faster than either arm answers them, so a queue builds), the engine driven directly. Reported per
arm: output tokens/s, TTFT and end-to-end p50/p99; the ratios, and whether both arms gave every request the same
greedy tokens. Targets: continuous ≥ 1.3× static throughput, lower p99 end-to-end.

Writes benchmarks/results/serve_load.json (`--quick`: a tiny run of the precision and batching parts, a few
requests and tokens, printed and not written; about a minute).

    python benchmarks/serve_load.py [--clients 16] [--tokens 64] [--rounds 2] [--quick]
        [--only generation|engines|classification|precision|batching]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import functools
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, write_result  # noqa: E402
from _trace import mixed_trace, run_trace, summary, trace_prompts  # noqa: E402

BASE = "builtin:smollm2-135m-instruct"
TOPICS = ["a dragon who learns to bake", "the history of the printing press", "a lighthouse keeper's winter",
          "how volcanoes form", "a robot that paints", "the life of honeybees", "a journey across the desert",
          "why the sky is blue", "a city under the sea", "the first flight of the Wright brothers",
          "a detective in Venice", "how bread rises", "a friendship between a fox and a crow",
          "the rings of Saturn", "a village festival in spring", "the invention of the telephone"]


def prompts(n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": f"Write a detailed story about {TOPICS[i % len(TOPICS)]}."}]
            for i in range(n)]


# ---- the server in a subprocess -------------------------------------------------------------------------
class Server:
    def __init__(self, args: list[str], log: Path):
        # unlimited rate, whatever the default: a limit would refuse the load this benchmark sends
        self.proc = subprocess.Popen([sys.executable, "-m", "tunelab", "serve", *args, "--port", "0",
                                      "--rate-limit", "0"],
                                     stdout=subprocess.PIPE, stderr=open(log, "w"), text=True,
                                     env={**os.environ, "TUNELAB_API_KEYS": ""})
        m = re.search(r"serving on (http://\S+)", self.proc.stdout.readline())
        if not m:
            raise SystemExit(f"server did not start; see {log}")
        self.url = m.group(1)
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/ready").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise SystemExit("server not ready")

    def rss_mb(self) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


# ---- generation --------------------------------------------------------------------------------------
def naive(convs: list[list[dict]], tokens: int) -> dict:
    import torch

    from tunelab.generate import load_generator

    gen = load_generator(BASE, "cpu")
    tok = gen.tokenizer
    stop_ids = [tok.convert_tokens_to_ids(s) for s in gen.stop if s in tok.get_vocab()]
    texts, counts, done_at = [], [], []
    start = time.perf_counter()
    with torch.inference_mode():
        for conv in convs:
            ids = torch.tensor([tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=True,
                                                        return_dict=True)["input_ids"]])
            out = gen.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                                     do_sample=False, eos_token_id=stop_ids, pad_token_id=tok.pad_token_id)
            new = [t for t in out[0, ids.shape[1]:].tolist() if t not in stop_ids]
            texts.append(tok.decode(new))
            counts.append(len(new))
            done_at.append(time.perf_counter() - start)
    wall = time.perf_counter() - start
    return {"requests": len(convs), "generated_tokens": sum(counts), "wall_s": round(wall, 2),
            "tokens_per_s": round(sum(counts) / wall, 1),
            "e2e_s_if_all_arrive_at_once": summary(done_at), "_texts": texts}


async def chat_stream(client: httpx.AsyncClient, url: str, conv: list[dict], tokens: int,
                      model: str = "smollm2-135m-instruct") -> dict:
    body = {"model": model, "messages": conv, "max_tokens": tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft, text, usage = None, "", None
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            return {"status": resp.status_code}
        async for line in resp.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk.get("choices", []):
                piece = c["delta"].get("content")
                if piece:
                    ttft = ttft if ttft is not None else time.perf_counter() - start
                    text += piece
    return {"status": 200, "ttft": ttft, "e2e": time.perf_counter() - start, "text": text,
            "tokens": usage["completion_tokens"] if usage else 0}


async def concurrent_round(url: str, convs: list[list[dict]], tokens: int,
                           model: str = "smollm2-135m-instruct") -> tuple[list[dict], float]:
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=len(convs))) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(chat_stream(client, url, c, tokens, model) for c in convs))
        return results, time.perf_counter() - start


async def fixed_rate(url: str, convs: list[list[dict]], tokens: int, rate: float) -> tuple[list[dict], float]:
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=64)) as client:
        start = time.perf_counter()
        tasks = []
        for i, conv in enumerate(convs):
            await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
            tasks.append(asyncio.create_task(chat_stream(client, url, conv, tokens)))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - start


def served_generation(convs, tokens: int, rounds: int, rate: float, rate_requests: int, tmp: Path) -> dict:
    srv = Server([BASE, "--embedding-model", "none", "--max-batch", str(max(16, len(convs))), "--precision", "fp32"],
                 tmp / "gen.log")  # fp32, as the anchor its answers are compared with
    try:
        asyncio.run(concurrent_round(srv.url, convs[:2], 8))  # warm-up
        results, walls = [], []
        for _ in range(rounds):
            res, wall = asyncio.run(concurrent_round(srv.url, convs, tokens))
            results += res
            walls.append(wall)
        ok = [r for r in results if r["status"] == 200]
        generated = sum(r["tokens"] for r in ok)
        concurrent = {"clients": len(convs), "rounds": rounds, "requests": len(results),
                      "failed": len(results) - len(ok), "generated_tokens": generated,
                      "wall_s": round(sum(walls), 2), "tokens_per_s": round(generated / sum(walls), 1),
                      "ttft_s": summary([r["ttft"] for r in ok]), "e2e_s": summary([r["e2e"] for r in ok]),
                      "_texts": [r["text"] for r in ok[:len(convs)]]}
        rss_before = srv.rss_mb()
        fixed_convs = prompts(rate_requests)
        res, wall = asyncio.run(fixed_rate(srv.url, fixed_convs, tokens // 2, rate))
        ok = [r for r in res if r["status"] == 200]
        fixed = {"rate_per_s": rate, "requests": len(res), "max_tokens": tokens // 2,
                 "failed": len(res) - len(ok), "statuses": sorted({r["status"] for r in res}),
                 "ttft_s": summary([r["ttft"] for r in ok]), "e2e_s": summary([r["e2e"] for r in ok]),
                 "rss_mb_before": round(rss_before, 1), "rss_mb_after": round(srv.rss_mb(), 1)}
        return {"concurrent": concurrent, "fixed_rate": fixed}
    finally:
        srv.stop()


# ---- engines: PyTorch, llama.cpp behind tunelab, bare llama.cpp -----------------------------------------
def served_engine(args: list[str], model: str, convs, tokens: int, single: int, log: Path) -> dict:
    """One server: `single` requests one at a time, then all of `convs` at once (after a warm-up)."""
    srv = Server([*args, "--embedding-model", "none", "--max-batch", str(len(convs))], log)
    try:
        asyncio.run(concurrent_round(srv.url, convs[:2], 8, model))  # warm-up
        alone = [asyncio.run(concurrent_round(srv.url, [c], tokens, model))[0][0] for c in convs[:single]]
        together, wall = asyncio.run(concurrent_round(srv.url, convs, tokens, model))
    finally:
        srv.stop()
    ok = [r for r in together if r["status"] == 200]
    return {"single_stream_tokens_per_s": round(sum(r["tokens"] for r in alone) / sum(r["e2e"] for r in alone), 1),
            "single_stream_ttft_s": summary([r["ttft"] for r in alone]),
            "concurrent_tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 1),
            "concurrent_e2e_s": summary([r["e2e"] for r in ok]), "failed": len(together) - len(ok),
            "_texts": [r["text"] for r in ok]}


def in_fresh_process(fn, *args):
    """`fn(*args)` in a new interpreter, as a user runs llama.cpp: run in this process after the in-process PyTorch
    arm, bare llama.cpp decoded 2.8x slower (38.7 vs 107.7 tokens/s alone), which would flatter the engine."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def bare_llama_cpp(gguf: Path, convs, tokens: int, single: int) -> dict:
    """llama.cpp itself on the same file: the same prompt token ids, slots and threads; no HTTP, no tunelab."""
    from concurrent.futures import ThreadPoolExecutor

    import torch
    import xllamacpp

    from tunelab.models import BaseRef, load_tokenizer

    tok = load_tokenizer(BaseRef(str(gguf.parent), gguf.parent))  # the export's: prompts rendered as the engine does
    ids = [tok(tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True),
               add_special_tokens=False)["input_ids"] for c in convs]
    p = xllamacpp.CommonParams()
    p.model.path = str(gguf)
    p.n_parallel = len(convs)
    p.n_ctx = 2048 * len(convs)
    p.cpuparams.n_threads = p.cpuparams_batch.n_threads = torch.get_num_threads()
    p.cpuparams.poll = p.cpuparams_batch.poll = 0  # as the engine runs it: what the server adds is all that differs
    p.warmup = False
    p.verbosity = 0
    server = xllamacpp.Server(p)

    def ask(prompt):
        start = time.perf_counter()
        out = server.handle_completions({"prompt": prompt, "max_tokens": tokens, "temperature": 0})
        return out["usage"]["completion_tokens"], time.perf_counter() - start

    ask(ids[0][:8])  # warm-up
    alone = [ask(i) for i in ids[:single]]
    start = time.perf_counter()
    with ThreadPoolExecutor(len(ids)) as pool:
        together = list(pool.map(ask, ids))
    wall = time.perf_counter() - start
    return {"single_stream_tokens_per_s": round(sum(n for n, _ in alone) / sum(t for _, t in alone), 1),
            "concurrent_tokens_per_s": round(sum(n for n, _ in together) / wall, 1)}


def engines(args, tmp: Path) -> dict:
    from tunelab.export import export_model

    gguf = Path(args.gguf) if args.gguf else tmp / "q8"
    if not args.gguf:
        print(f"exporting {args.model} to GGUF Q8_0 …", flush=True)
        export_model(args.model, gguf, "gguf", quantize="q8_0")
    convs = prompts(args.clients)
    print("engines: PyTorch, llama.cpp behind tunelab, bare llama.cpp …", flush=True)
    arms = {"pytorch": served_engine([f"m={args.model}", "--precision", "fp32"], "m", convs, args.tokens, args.single,
                                     tmp / "pt.log"),
            "llama_cpp_engine": served_engine([f"m={gguf}"], "m", convs, args.tokens, args.single,
                                              tmp / "llama.log"),
            "bare_llama_cpp": in_fresh_process(bare_llama_cpp, gguf / "model.gguf", convs, args.tokens, args.single)}
    same = sum(a == b for a, b in zip(arms["pytorch"].pop("_texts"), arms["llama_cpp_engine"].pop("_texts")))
    pt, ll, bare = arms["pytorch"], arms["llama_cpp_engine"], arms["bare_llama_cpp"]
    return {"model": args.model, "gguf": "Q8_0", "max_tokens": args.tokens, "clients": args.clients,
            "single_stream_requests": args.single, **arms,
            "greedy_answers_equal_pytorch_vs_llama_cpp": f"{same}/{len(convs)}",
            "single_stream_ratio_llama_cpp_vs_pytorch": round(ll["single_stream_tokens_per_s"]
                                                              / pt["single_stream_tokens_per_s"], 2),
            "concurrent_ratio_llama_cpp_vs_pytorch": round(ll["concurrent_tokens_per_s"]
                                                           / pt["concurrent_tokens_per_s"], 2),
            "single_stream_engine_vs_bare": round(ll["single_stream_tokens_per_s"]
                                                  / bare["single_stream_tokens_per_s"], 2),
            "concurrent_engine_vs_bare": round(ll["concurrent_tokens_per_s"] / bare["concurrent_tokens_per_s"], 2)}


# ---- classification ------------------------------------------------------------------------------------
def classifier_dir(tmp: Path) -> Path:
    from tunelab.models import library_versions, load_classifier, save_model_dir

    labels = ["negative", "neutral", "positive"]
    model, tok, _, _ = load_classifier("builtin:minilm-l6", labels)
    return save_model_dir(model, tok, tmp / "minilm-sentiment", {
        "task": "classification", "labels": labels, "max_length": 128, "method": {"name": "full"},
        "base": {"ref": "builtin:minilm-l6"}, "versions": library_versions()})


def tweets(n: int) -> list[str]:
    import pandas as pd

    from tunelab.assets import builtin_path

    df = pd.read_csv(builtin_path("builtin:tweets-sentiment"), encoding_errors="replace")
    texts = [t for t in df["text"].astype(str).tolist() if t.strip()]
    return texts[:n]


async def post_keepalive(reader, writer, host: str, path: str, body: bytes) -> tuple[int, bytes]:
    """One HTTP/1.1 request on an open keep-alive connection: a lean load generator (like wrk), so that the
    client's own CPU — on the same two cores — weighs as little as possible on the server being measured."""
    writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))
    return status, await reader.readexactly(length)


async def classify_load(url: str, texts: list[str], clients: int) -> tuple[list[dict], float]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    queue = list(texts)
    results: list[dict] = []

    async def worker():
        reader, writer = await asyncio.open_connection(host, int(port))
        while queue:
            body = json.dumps({"model": "minilm-sentiment", "input": queue.pop()}).encode()
            start = time.perf_counter()
            status, _ = await post_keepalive(reader, writer, host, "/v1/classify", body)
            results.append({"status": status, "latency": time.perf_counter() - start})
        writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return results, time.perf_counter() - start


CLASSIFY_ARMS = {
    "one_by_one_fp32": ["--encoder-batch", "1", "--encoder-wait-ms", "0", "--precision", "fp32"],
    "micro_batched_fp32": ["--encoder-batch", "64", "--encoder-wait-ms", "5", "--precision", "fp32"],
    "micro_batched_default": ["--encoder-batch", "64", "--encoder-wait-ms", "5"],
    "onnx_int8_micro_batched": ["--encoder-batch", "64", "--encoder-wait-ms", "5"],  # served from the ONNX export
}


def served_classification(model_dir: Path, texts: list[str], clients: int, arm: str, tmp: Path) -> dict:
    srv = Server([f"minilm-sentiment={model_dir}", "--embedding-model", "none", "--max-waiting", "256",
                  *CLASSIFY_ARMS[arm]], tmp / f"{arm}.log")
    try:
        asyncio.run(classify_load(srv.url, texts[:64], clients))  # warm-up
        res, wall = asyncio.run(classify_load(srv.url, texts, clients))
    finally:
        srv.stop()
    ok = [r for r in res if r["status"] == 200]
    return {"flags": " ".join(CLASSIFY_ARMS[arm]), "clients": clients, "requests": len(res),
            "failed": len(res) - len(ok), "wall_s": round(wall, 2), "requests_per_s": round(len(ok) / wall, 1),
            "latency_s": summary([r["latency"] for r in ok])}


def generation(args, tmp: Path) -> dict:
    convs = prompts(args.clients)
    print(f"naive: {args.clients} requests one by one with model.generate …", flush=True)
    anchor = naive(convs, args.tokens)
    print(f"tunelab serve: {args.clients} concurrent clients × {args.rounds} rounds …", flush=True)
    served = served_generation(convs, args.tokens, args.rounds, args.rate, args.rate_requests, tmp)
    same = sum(a == b for a, b in zip(anchor.pop("_texts"), served["concurrent"].pop("_texts")))
    conc = served["concurrent"]
    return {"model": BASE, "max_tokens": args.tokens, "naive_generate": anchor, "tunelab": served,
            "answers_equal_to_naive_greedy": f"{same}/{args.clients}",
            "throughput_ratio": round(conc["tokens_per_s"] / anchor["tokens_per_s"], 2),
            "p99_over_p50_e2e": round(conc["e2e_s"]["p99"] / conc["e2e_s"]["p50"], 2)}


def classification(args, tmp: Path) -> dict:
    from tunelab.export import export_model

    texts = tweets(args.classify_requests)
    model_dir = classifier_dir(tmp)
    export_model(str(model_dir), tmp / "onnx-int8", "onnx", quantize="int8", thresholds={})  # a random head
    print("classification: one by one vs micro-batched vs ONNX int8 …", flush=True)
    arms = {arm: served_classification(tmp / "onnx-int8" if arm.startswith("onnx") else model_dir, texts,
                                       args.classify_clients, arm, tmp) for arm in CLASSIFY_ARMS}
    anchor_rps = arms["one_by_one_fp32"]["requests_per_s"]
    default_rps = arms["micro_batched_default"]["requests_per_s"]
    return {"model": "builtin:minilm-l6 + 3-label head", "texts": "real tweets, one per request", **arms,
            "ratio_micro_batched_fp32": round(arms["micro_batched_fp32"]["requests_per_s"] / anchor_rps, 2),
            "ratio_micro_batched_default": round(default_rps / anchor_rps, 2),
            "ratio_onnx_int8_vs_pytorch_default": round(arms["onnx_int8_micro_batched"]["requests_per_s"]
                                                        / default_rps, 2)}


# ---- precision: bf16 vs fp32 ----------------------------------------------------------------------------
@functools.cache
def smollm2():
    """SmolLM2 in fp32 in this process, loaded once (the precision and batching parts share it)."""
    from tunelab.generate import load_generator

    return load_generator(BASE, "cpu")


def precision(args, tmp: Path) -> dict:
    from tunelab.serve.precision import AGREEMENT_TEXTS, bf16_agreement
    from tunelab.train.precision import bf16_supported

    convs = prompts(args.clients)
    print("precision: tunelab serve in fp32 and in bf16 …", flush=True)
    arms = {p: served_engine([BASE, "--precision", p], "smollm2-135m-instruct", convs, args.tokens, args.single,
                             tmp / f"{p}.log") for p in ("fp32", "bf16")}
    same = sum(a == b for a, b in zip(arms["fp32"].pop("_texts"), arms["bf16"].pop("_texts")))
    print("precision: bf16 vs fp32 teacher-forced …", flush=True)
    agreement = {k: round(v, 4) for k, v in bf16_agreement(smollm2().model, smollm2().tokenizer).items()}
    fp32, bf16 = arms["fp32"], arms["bf16"]
    return {"model": BASE, "native_bf16": bf16_supported("cpu"), "max_tokens": args.tokens, "clients": args.clients,
            "single_stream_requests": args.single, **arms,
            "single_stream_ratio_bf16_vs_fp32": round(bf16["single_stream_tokens_per_s"]
                                                      / fp32["single_stream_tokens_per_s"], 2),
            "concurrent_ratio_bf16_vs_fp32": round(bf16["concurrent_tokens_per_s"]
                                                   / fp32["concurrent_tokens_per_s"], 2),
            "greedy_answers_equal_bf16_vs_fp32": f"{same}/{len(convs)}",
            "agreement_teacher_forced": {"texts": f"{len(AGREEMENT_TEXTS)} real sentences (English, Chinese), "
                                                  "prompt + continuation", **agreement}}


# ---- batching: continuous vs static on a mixed trace ------------------------------------------------------
def batching(args, tmp: Path) -> dict:
    from tunelab.serve.precision import decoding_precision
    from tunelab.serve.engine import GenerationEngine

    model, tok = copy.deepcopy(smollm2().model), smollm2().tokenizer
    dtype = decoding_precision(model, "auto", "cpu")  # the server's default, the same in both arms
    bounds = dict(prompt=(16, 64), output=(8, 32)) if args.quick else {}
    trace = mixed_trace(args.trace_requests, args.trace_rate, seed=0, **bounds)
    stream = tok("\n".join(tweets(4000)), add_special_tokens=False)["input_ids"]
    prompts_ = trace_prompts(trace, stream)
    warm = mixed_trace(2, 100.0, seed=1, prompt=(16, 32), output=(4, 8))
    arms = {}
    for arm in ("static", "continuous"):
        print(f"batching: {arm}, {len(trace)} requests at {args.trace_rate}/s …", flush=True)
        engine = GenerationEngine(model, tok, stop_ids=[], max_batch=args.clients, max_waiting=len(trace),
                                  name=arm, batching=arm)
        try:
            run_trace(engine, warm, trace_prompts(warm, stream))
            arms[arm] = run_trace(engine, trace, prompts_)
        finally:
            engine.close()
    same = sum(a == b for a, b in zip(arms["static"].pop("_tokens"), arms["continuous"].pop("_tokens")))
    cont, stat = arms["continuous"], arms["static"]
    lengths = {k: summary([getattr(r, k) for r in trace]) for k in ("prompt_tokens", "output_tokens")}
    return {"model": BASE, "precision": dtype, "max_batch": args.clients,
            "trace": {"requests": len(trace), "rate_per_s": args.trace_rate, "seed": 0,
                      "arrivals": "Poisson (exponential gaps)",
                      "prompt_tokens": f"log-uniform {bounds.get('prompt', (16, 512))}, real tweets",
                      "output_tokens": f"log-uniform {bounds.get('output', (8, 256))}, no stop token",
                      "last_arrival_s": trace[-1].arrival_s, **lengths},
            "static": stat, "continuous": cont,
            "throughput_ratio_continuous_vs_static": round(cont["output_tokens_per_s"]
                                                           / stat["output_tokens_per_s"], 2),
            "p99_e2e_ratio_static_vs_continuous": round(stat["e2e_s"]["p99"] / cont["e2e_s"]["p99"], 2),
            "p99_ttft_ratio_static_vs_continuous": round(stat["ttft_s"]["p99"] / cont["ttft_s"]["p99"], 2),
            "greedy_answers_equal_static_vs_continuous": f"{same}/{len(trace)}"}


def targets_met(result: dict) -> dict:
    """The targets of the parts in `result` -> {target: met}."""
    gen, clf, eng = result.get("generation"), result.get("classification"), result.get("engines")
    prec, bat = result.get("precision"), result.get("batching")
    targets, failures = {}, []
    if gen:
        conc, fixed = gen["tunelab"]["concurrent"], gen["tunelab"]["fixed_rate"]
        targets.update({"generation_throughput_ratio>=4": gen["throughput_ratio"] >= 4,
                        "p99<=3xp50": gen["p99_over_p50_e2e"] <= 3})
        failures += [conc["failed"], fixed["failed"]]
    if clf:
        arms = [v for v in clf.values() if isinstance(v, dict)]
        targets["classification_ratio>=5"] = clf["ratio_micro_batched_default"] >= 5
        if "ratio_onnx_int8_vs_pytorch_default" in clf:
            targets["onnx_int8_vs_pytorch_classification>=2"] = clf["ratio_onnx_int8_vs_pytorch_default"] >= 2
        failures += [a["failed"] for a in arms]
    if eng:
        targets.update({"llama_cpp_single_stream>=5x_pytorch": eng["single_stream_ratio_llama_cpp_vs_pytorch"] >= 5,
                        "llama_cpp_16_clients>=1.3x_pytorch": eng["concurrent_ratio_llama_cpp_vs_pytorch"] >= 1.3,
                        "engine_within_10%_of_bare_llama_cpp": min(eng["single_stream_engine_vs_bare"],
                                                                   eng["concurrent_engine_vs_bare"]) >= 0.9})
    if prec:
        targets["bf16_top1_agreement>=0.9"] = prec["agreement_teacher_forced"]["top1_agreement"] >= 0.9
        if prec["native_bf16"]:  # emulated bf16 is slower than fp32: no speed target there
            targets.update({"bf16_single_stream>fp32": prec["single_stream_ratio_bf16_vs_fp32"] > 1,
                            "bf16_16_clients>fp32": prec["concurrent_ratio_bf16_vs_fp32"] > 1})
        failures += [prec["fp32"]["failed"], prec["bf16"]["failed"]]
    if bat:
        targets.update({"continuous>=1.3x_static_throughput": bat["throughput_ratio_continuous_vs_static"] >= 1.3,
                        "continuous_p99_e2e<static": bat["p99_e2e_ratio_static_vs_continuous"] > 1})
    targets["zero_failures"] = not any(failures)
    return targets


PARTS = {"generation": generation, "engines": engines, "classification": classification, "precision": precision,
         "batching": batching}
QUICK = {"clients": 4, "tokens": 16, "rounds": 1, "single": 2, "rate_requests": 4, "classify_requests": 64,
         "classify_clients": 8, "trace_requests": 8, "trace_rate": 4.0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients; batching: the engine's max_batch")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--rate", type=float, default=1.0, help="fixed-rate run: requests per second")
    ap.add_argument("--rate-requests", type=int, default=40)
    ap.add_argument("--classify-requests", type=int, default=640)
    ap.add_argument("--classify-clients", type=int, default=32)
    ap.add_argument("--model", default=BASE, help="engines: the decoder (a model dir or base) and its GGUF export")
    ap.add_argument("--gguf", help="engines: an existing GGUF export dir of --model (skips the export)")
    ap.add_argument("--single", type=int, default=4, help="engines, precision: requests sent one at a time")
    ap.add_argument("--trace-requests", type=int, default=48, help="batching: requests in the mixed trace")
    ap.add_argument("--trace-rate", type=float, default=3.0, help="batching: mean arrivals per second")
    ap.add_argument("--only", choices=list(PARTS),
                    help="run one part; the others are kept from the previous results file")
    ap.add_argument("--quick", action="store_true", help="a tiny run (precision and batching unless --only) to "
                    f"check the script works: {QUICK}; printed, not written")
    args = ap.parse_args()
    if args.quick:
        vars(args).update(QUICK)
    previous = RESULTS / "serve_load.json"
    result = json.loads(previous.read_text()) if args.only and not args.quick and previous.exists() else {}
    result = {part: result.get(part) for part in PARTS}
    run = [args.only] if args.only else (["precision", "batching"] if args.quick else list(PARTS))
    with tempfile.TemporaryDirectory() as d:
        for part in run:
            result[part] = PARTS[part](args, Path(d))
            print(json.dumps(result[part], indent=1), flush=True)
    targets = targets_met(result)
    if args.quick:
        print(json.dumps(targets), "\n(--quick: nothing written)")
        return
    path = write_result("serve_load", {**result, "targets_met": targets})
    print(json.dumps(targets), f"\nwrote {path}")


if __name__ == "__main__":
    main()

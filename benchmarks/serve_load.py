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

Writes benchmarks/results/serve_load.json.

    python benchmarks/serve_load.py [--clients 16] [--tokens 64] [--rounds 2] [--only generation|engines|classification]
"""

from __future__ import annotations

import argparse
import asyncio
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

BASE = "builtin:smollm2-135m-instruct"
TOPICS = ["a dragon who learns to bake", "the history of the printing press", "a lighthouse keeper's winter",
          "how volcanoes form", "a robot that paints", "the life of honeybees", "a journey across the desert",
          "why the sky is blue", "a city under the sea", "the first flight of the Wright brothers",
          "a detective in Venice", "how bread rises", "a friendship between a fox and a crow",
          "the rings of Saturn", "a village festival in spring", "the invention of the telephone"]


def prompts(n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": f"Write a detailed story about {TOPICS[i % len(TOPICS)]}."}]
            for i in range(n)]


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))]


def summary(values: list[float]) -> dict:
    return {"p50": round(pct(values, 50), 3), "p99": round(pct(values, 99), 3), "max": round(max(values), 3)}


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
    srv = Server([BASE, "--embedding-model", "none", "--max-batch", str(max(16, len(convs)))], tmp / "gen.log")
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
    arms = {"pytorch": served_engine([f"m={args.model}"], "m", convs, args.tokens, args.single, tmp / "pt.log"),
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--rate", type=float, default=1.0, help="fixed-rate run: requests per second")
    ap.add_argument("--rate-requests", type=int, default=40)
    ap.add_argument("--classify-requests", type=int, default=640)
    ap.add_argument("--classify-clients", type=int, default=32)
    ap.add_argument("--model", default=BASE, help="engines: the decoder (a model dir or base) and its GGUF export")
    ap.add_argument("--gguf", help="engines: an existing GGUF export dir of --model (skips the export)")
    ap.add_argument("--single", type=int, default=4, help="engines: requests sent one at a time")
    ap.add_argument("--only", choices=["generation", "engines", "classification"],
                    help="run one part; the others are kept from the previous results file")
    args = ap.parse_args()
    previous = RESULTS / "serve_load.json"
    result = json.loads(previous.read_text()) if args.only and previous.exists() else {}
    with tempfile.TemporaryDirectory() as d:
        for part, fn in (("generation", generation), ("engines", engines), ("classification", classification)):
            if args.only in (None, part):
                result[part] = fn(args, Path(d))
                print(json.dumps(result[part], indent=1), flush=True)
    gen, clf, eng = result["generation"], result["classification"], result.get("engines")
    conc, fixed = gen["tunelab"]["concurrent"], gen["tunelab"]["fixed_rate"]
    arms = [v for v in clf.values() if isinstance(v, dict)]
    targets = {"generation_throughput_ratio>=4": gen["throughput_ratio"] >= 4,
               "p99<=3xp50": gen["p99_over_p50_e2e"] <= 3,
               "classification_ratio>=5": clf["ratio_micro_batched_default"] >= 5,
               "zero_failures": conc["failed"] == 0 and fixed["failed"] == 0 and all(a["failed"] == 0 for a in arms)}
    if "ratio_onnx_int8_vs_pytorch_default" in clf:
        targets["onnx_int8_vs_pytorch_classification>=2"] = clf["ratio_onnx_int8_vs_pytorch_default"] >= 2
    if eng:
        targets.update({"llama_cpp_single_stream>=5x_pytorch": eng["single_stream_ratio_llama_cpp_vs_pytorch"] >= 5,
                        "llama_cpp_16_clients>=1.3x_pytorch": eng["concurrent_ratio_llama_cpp_vs_pytorch"] >= 1.3,
                        "engine_within_10%_of_bare_llama_cpp": min(eng["single_stream_engine_vs_bare"],
                                                                   eng["concurrent_engine_vs_bare"]) >= 0.9})
    path = write_result("serve_load", {"generation": gen, "engines": eng, "classification": clf,
                                       "targets_met": targets})
    print(json.dumps(targets), f"\nwrote {path}")


if __name__ == "__main__":
    main()

"""What embedding a shopper's query costs the frontend: onnxruntime in the API vs a torch worker.

Side by side in one run, alternating query by query, for a tiny open_clip CLIP and a
ViT-B-16-shaped one (random weights, ``open_clip.create_model("ViT-B-16")``; latency does
not depend on the weights), the time from "the API has the text" to "the API has the
unit vector":
- onnx: in the API process, core.shop.onnx_encoder (tokenise + onnxruntime), with
  --threads intra-op threads and, as onnx_1thread, with the encoder's default of one;
- worker: the API enqueues the text over arq/Redis to a worker process holding the torch
  model and awaits the answer; once with short polling (worker 5 ms, client 5 ms: the
  best arq gives) and once with arq's defaults (0.5 s both ends, as the service's
  workers run);
- torch: the torch model in the calling process, for reference (what the worker computes).
Also the image tower through ONNX (preprocess + run; torch alongside for reference), and,
in a torch-free subprocess, what loading the encoder costs an API process (time, RSS).

    .venv/bin/python -m bench.query_embedding [--repeats 100] [--threads 2]

Prints a table and writes bench/results/query_embedding.json. Redis database 14 only
(flushed before and after; the tests use 15).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from arq import create_pool
from arq.connections import ArqRedis, RedisSettings
from arq.worker import Worker, func
from open_clip.model import CLIP, get_model_preprocess_cfg
from open_clip.transform import PreprocessCfg, image_transform
from PIL import Image

from bench.results_file import write_result
from core.ml.fashion_clip.onnx_export import export_onnx
from core.shop.onnx_encoder import OnnxClipEncoder

REDIS_URL = "redis://127.0.0.1:6379/14"  # not 0 (development) nor 15 (tests)
SIZES = ("tiny", "ViT-B-16")
SEED = 0
# The tiny tower of the unit tests: real open_clip modules, narrow and shallow.
TINY_EMBED_DIM = 32
TINY_VISION = {"image_size": 32, "patch_size": 8, "width": 64, "head_width": 32, "layers": 2}
TINY_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2}
# The short-polling worker: how often it looks at its queue and the API at the result.
FAST_POLL_S = 0.005
ARQ_DEFAULT_POLL_S = 0.5  # arq's Worker(poll_delay=) and Job.result(poll_delay=)
RESULT_TIMEOUT_S = 60
KEEP_RESULT_S = 60  # the API reads the answer within milliseconds; arq's default is 1 h
# Between two measurements: queries reach an API apart, and idle thread pools (torch's,
# onnxruntime's) must not be caught spinning from the previous measurement.
PAUSE_S = 0.02
WORKER_START_TIMEOUT_S = 180
# An uploaded photo as the API has it after decoding: portrait, phone-ish size.
UPLOAD_SIZE = (600, 800)
QUERIES = [
    "black leather ankle boots",
    "a red silk slip dress",
    "Dolce & Gabbana floral print shirt",
    "oversized cashmere cardigan in camel",
    "Saint Laurent Le Loulou quilted shoulder bag",
    "wide-leg linen trousers, off-white",
    "Harry Potter Gryffindor scarf",
    "vintage Levi's 501 jeans",
    "minimalist gold hoop earrings",
    "waterproof trench coat with belt",
    "chunky white sneakers",
    "Maison Margiela Tabi boots",
]
# Measured in a python that imports only core.shop: what an API worker process pays.
API_PROBE = """
import json, sys, time
from pathlib import Path
def memory_mb():  # VmHWM is the peak since exec; ru_maxrss would include the parent's
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {key: int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM")}
start = time.perf_counter()
from core.shop.onnx_encoder import OnnxClipEncoder
imported = time.perf_counter()
encoder = OnnxClipEncoder.load(Path(sys.argv[1]), intra_op_threads=int(sys.argv[2]))
loaded = time.perf_counter()
encoder.encode_texts(["first query"])
first = time.perf_counter()
print(json.dumps({
    "import_s": imported - start, "load_s": loaded - imported, "first_query_s": first - loaded,
    "rss_mb": memory_mb()["VmRSS"], "peak_rss_mb": memory_mb()["VmHWM"],
    "torch_imported": "torch" in sys.modules,
}))
"""


def build_model(size: str) -> CLIP:
    """The same weights in every process: seeded initialisation on the CPU."""
    torch.manual_seed(SEED)
    if size == "tiny":
        return CLIP(TINY_EMBED_DIM, TINY_VISION, TINY_TEXT).eval()
    logging.disable(logging.WARNING)  # "No pretrained weights loaded": that is the point
    try:
        return open_clip.create_model(size, pretrained=None).eval()
    finally:
        logging.disable(logging.NOTSET)


def torch_text(model: CLIP, tokenizer: Any, text: str) -> np.ndarray:
    with torch.inference_mode():
        return F.normalize(model.encode_text(tokenizer([text])), dim=-1)[0].numpy()


# --- the worker side --------------------------------------------------------------------


def run_worker(queue: str, poll_s: float, threads: int) -> None:
    """A process holding the torch models, answering ``embed_text(size, text)`` over arq."""
    torch.set_num_threads(threads)
    models = {size: build_model(size) for size in SIZES}
    tokenizer = open_clip.get_tokenizer("ViT-B-16")

    async def embed_text(ctx: dict[str, Any], size: str, text: str) -> np.ndarray:
        return torch_text(models[size], tokenizer, text)

    Worker(
        functions=[func(embed_text, name="embed_text")],
        queue_name=queue,
        redis_settings=RedisSettings.from_dsn(REDIS_URL),
        poll_delay=poll_s,
        keep_result=KEEP_RESULT_S,
        max_jobs=1,
        handle_signals=True,
    ).run()


def start_worker(queue: str, poll_s: float, threads: int) -> subprocess.Popen[bytes]:
    args = ["--worker", queue, "--poll", str(poll_s), "--threads", str(threads)]
    return subprocess.Popen([sys.executable, "-m", "bench.query_embedding", *args])


def stop_worker(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)  # arq finishes its job and leaves
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


async def ask_worker(pool: ArqRedis, queue: str, poll_s: float, size: str, text: str) -> np.ndarray:
    job = await pool.enqueue_job("embed_text", size, text, _queue_name=queue)
    assert job is not None
    result: np.ndarray = await job.result(timeout=RESULT_TIMEOUT_S, poll_delay=poll_s)
    return result


# --- the API side -----------------------------------------------------------------------


def timed(fn: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn(*args)
    return (time.perf_counter() - start) * 1000, out


async def timed_async(awaitable: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    out = await awaitable
    return (time.perf_counter() - start) * 1000, out


def summary(samples_ms: list[float]) -> dict[str, float]:
    values = np.asarray(samples_ms)
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {
        "n": len(samples_ms),
        "p50": float(p50),
        "p95": float(p95),
        "p99": float(p99),
        "mean": float(values.mean()),
    }


async def text_latencies(
    size: str,
    model: CLIP,
    encoders: dict[str, OnnxClipEncoder],
    pool: ArqRedis,
    args: argparse.Namespace,
) -> tuple[dict[str, list[float]], float]:
    """Alternating per query, so machine drift hits every way alike. Returns the samples
    and the largest |worker - onnx| difference seen."""
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    ways = (*encoders, "torch", "worker_fast", "worker_arq")
    runs: dict[str, list[float]] = {way: [] for way in ways}
    worst = 0.0
    repeats = args.repeats if size == "tiny" else args.vit_repeats
    every = max(1, repeats // args.arq_default_repeats)
    for index in range(args.warmup + repeats):
        text = QUERIES[index % len(QUERIES)]
        sample: dict[str, float] = {}
        for name, encoder in encoders.items():
            sample[name], onnx_vecs = timed(encoder.encode_texts, [text])
            await asyncio.sleep(PAUSE_S)
        sample["torch"], _ = timed(torch_text, model, tokenizer, text)
        await asyncio.sleep(PAUSE_S)
        fast = ask_worker(pool, "bench:fast", FAST_POLL_S, size, text)
        sample["worker_fast"], worker_vec = await timed_async(fast)
        await asyncio.sleep(PAUSE_S)
        worst = max(worst, float(np.abs(worker_vec - onnx_vecs[0]).max()))
        if index >= args.warmup and index % every == 0:
            slow = ask_worker(pool, "bench:arq", ARQ_DEFAULT_POLL_S, size, text)
            sample["worker_arq"] = (await timed_async(slow))[0]
            await asyncio.sleep(PAUSE_S)
        if index >= args.warmup:
            for way, ms in sample.items():
                runs[way].append(ms)
    return runs, worst


def torch_image(model: CLIP, transform: Any, photo: Image.Image) -> np.ndarray:
    with torch.inference_mode():
        return F.normalize(model.encode_image(transform(photo)[None]), dim=-1)[0].numpy()


def image_latencies(
    model: CLIP, encoders: dict[str, OnnxClipEncoder], repeats: int
) -> tuple[dict[str, list[float]], float]:
    config = encoders["onnx"].config
    transform = image_transform(
        config.image_size,
        is_train=False,
        mean=config.mean,
        std=config.std,
        resize_mode=config.resize_mode,
        interpolation=config.interpolation,
    )
    rng = np.random.default_rng(SEED)
    runs: dict[str, list[float]] = {way: [] for way in (*encoders, "preprocess", "torch")}
    worst = 0.0
    for _ in range(repeats + 1):  # the first round warms up
        pixels = rng.integers(0, 256, (UPLOAD_SIZE[1], UPLOAD_SIZE[0], 3), dtype=np.uint8)
        photo = Image.fromarray(pixels)
        for name, encoder in encoders.items():
            onnx_ms, onnx_vecs = timed(encoder.encode_images, [photo])
            runs[name].append(onnx_ms)
            time.sleep(PAUSE_S)
        runs["preprocess"].append(timed(encoders["onnx"].preprocess, [photo])[0])
        torch_ms, torch_vec = timed(torch_image, model, transform, photo)
        runs["torch"].append(torch_ms)
        time.sleep(PAUSE_S)
        worst = max(worst, float(np.abs(onnx_vecs[0] - torch_vec).max()))
    return {name: samples[1:] for name, samples in runs.items()}, worst


def export(model: CLIP, out_dir: Path) -> None:
    """No heads (identity): they are [D, D] adapters, nothing next to a tower."""
    preprocess = {**asdict(PreprocessCfg()), **get_model_preprocess_cfg(model)}
    export_onnx(
        model,
        None,
        None,
        out_dir,
        preprocess["size"],
        preprocess["mean"],
        preprocess["std"],
        resize_mode=preprocess["resize_mode"],
        interpolation=preprocess["interpolation"],
    )


def file_sizes_mb(out_dir: Path) -> dict[str, float]:
    return {path.name: path.stat().st_size / 2**20 for path in sorted(out_dir.glob("*.onnx"))}


def api_probe(model_dir: Path, threads: int) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", API_PROBE, str(model_dir), str(threads)],
        capture_output=True,
        text=True,
        check=True,
    )
    return dict(json.loads(done.stdout))


async def measure_size(
    size: str, pool: ArqRedis, out_dir: Path, args: argparse.Namespace
) -> dict[str, Any]:
    model = build_model(size)
    export_s = timed(export, model, out_dir)[0] / 1000
    encoders = {
        "onnx": OnnxClipEncoder.load(out_dir, intra_op_threads=args.threads),
        "onnx_1thread": OnnxClipEncoder.load(out_dir, intra_op_threads=1),
    }
    text_runs, worker_error = await text_latencies(size, model, encoders, pool, args)
    image_repeats = args.image_repeats if size != "tiny" else args.repeats // 2
    image_runs, image_error = image_latencies(model, encoders, image_repeats)
    return {
        "export_s": export_s,
        "onnx_mb": file_sizes_mb(out_dir),
        "text_ms": {name: summary(samples) for name, samples in text_runs.items()},
        "image_ms": {name: summary(samples) for name, samples in image_runs.items()},
        "max_abs_error": {
            "onnx_vs_torch_at_export": encoders["onnx"].config.provenance["check_max_abs_error"],
            "text_worker_vs_onnx": worker_error,
            "image_onnx_vs_torch_with_open_clip_preprocessing": image_error,
        },
        "api_process": api_probe(out_dir, args.threads),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    pool = await create_pool(RedisSettings.from_dsn(REDIS_URL))
    await pool.flushdb()
    workers = [
        start_worker("bench:fast", FAST_POLL_S, args.threads),
        start_worker("bench:arq", ARQ_DEFAULT_POLL_S, args.threads),
    ]
    try:
        for queue, poll_s in (("bench:fast", FAST_POLL_S), ("bench:arq", ARQ_DEFAULT_POLL_S)):
            job = await pool.enqueue_job("embed_text", "tiny", "ready?", _queue_name=queue)
            assert job is not None
            await job.result(timeout=WORKER_START_TIMEOUT_S, poll_delay=poll_s)
        with tempfile.TemporaryDirectory(prefix="query-embedding-") as tmp:
            return {size: await measure_size(size, pool, Path(tmp) / size, args) for size in SIZES}
    finally:
        for process in workers:
            stop_worker(process)
        await pool.flushdb()
        await pool.aclose()


def report(results: dict[str, Any], args: argparse.Namespace, load: list[float]) -> None:
    print(f"\nquery embedding latency, ms ({args.threads} threads, {os.cpu_count()} CPUs)\n")
    print(f"{'model':<10}{'what':<22}{'way':<18}{'n':>5}{'p50':>9}{'p95':>9}{'p99':>9}")
    for size, result in results.items():
        for what in ("text_ms", "image_ms"):
            for way, stats in result[what].items():
                print(
                    f"{size:<10}{what[:-3]:<22}{way:<18}{stats['n']:>5}"
                    f"{stats['p50']:>9.2f}{stats['p95']:>9.2f}{stats['p99']:>9.2f}"
                )
        api = result["api_process"]
        print(
            f"{size:<10}export {result['export_s']:.1f} s; API process: import "
            f"{api['import_s']:.2f} s, load {api['load_s']:.2f} s, RSS {api['rss_mb']:.0f} MB "
            f"(peak {api['peak_rss_mb']:.0f}); errors {result['max_abs_error']}"
        )
    # The 1-minute load average at start and end: other processes on the machine show here.
    print(f"load average {load[0]:.2f} at start, {load[1]:.2f} at the end")
    record = {"threads": args.threads, "loadavg_start_end": load, "results": results}
    write_result("query_embedding", record)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.query_embedding")
    parser.add_argument("--repeats", type=int, default=150, help="tiny: text queries per way")
    parser.add_argument("--vit-repeats", type=int, default=60, help="ViT-B-16: the same")
    parser.add_argument("--arq-default-repeats", type=int, default=20)
    parser.add_argument("--image-repeats", type=int, default=20, help="ViT-B-16 photos")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--worker", metavar="QUEUE", help=argparse.SUPPRESS)
    parser.add_argument("--poll", type=float, default=ARQ_DEFAULT_POLL_S, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args.worker, args.poll, args.threads)
        return
    torch.set_num_threads(args.threads)
    started, load_start = time.perf_counter(), os.getloadavg()[0]
    results = asyncio.run(run(args))
    report(results, args, [load_start, os.getloadavg()[0]])
    print(f"took {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()

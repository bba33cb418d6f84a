"""What the service costs on top of the model: a whole look through the stack vs. direct calls,
and what shop-the-look (grounding + reranking + matching) costs of a look.

Side by side in one run, alternating, on the `tiny` profile (CPU), over one catalog
(the fixture shop, crawled and embedded once into the benchmark's own database):
- stack: the API (uvicorn), scheduler and a GPU worker process; a subject upload
  and a generation that trains first, timed from the job rows (queue waits, train,
  generate), from the generate job's ``result["timings"]`` (its stages) and from
  the client (request to every kept image downloaded);
- direct: ``bench.look_direct``, the same work with core's functions in this
  process (training planned by ``plan_training``, with prior preservation and
  checkpoints; grounding, candidates, reranking, matching through
  ``core.shop.look``), no job rows, queue or HTTP.
Each repeat checks that both sides did the same work (steps, class images,
candidates, grounding products, kept images, product links) and stops if not.
The ratio stack/direct is the price of durability, progress and scheduling.

    .venv/bin/python -m bench.look_tiny [--repeats 3] [--steps 40] [--redis-db 11]

Prints a table and writes bench/results/look_tiny.json.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import time
from datetime import datetime
from typing import Any

import httpx
import torch

from bench.bench_stack import (
    HTTP_TIMEOUT_S,
    bench_environment,
    catalog_products,
    crawl_and_embed,
    migrate,
    restore_signals,
)
from bench.results_file import write_result
from core.ml.resident import offline_quiet_env

offline_quiet_env()

from bench.look_direct import DirectLook, LookWork  # noqa: E402 (after the environment is set)
from core.ml.profiles import get_profile  # noqa: E402
from core.settings import get_settings  # noqa: E402
from demo.__main__ import PHOTOS, ROOT, Stack, _new_key, _wait_healthy  # noqa: E402

BENCH_DIR = ROOT / "var" / "bench-look"  # blobs, the direct side's store, class images
PROMPT = "a Harry Potter costume"
CLASS_NOUN = "woman"
SEED = 1
# How often the client polls a job, as a web frontend would.
POLL_S = 0.5
# Training steps of the warm-up look, which loads the models and makes the class images.
WARM_UP_STEPS = 2
SHOP_STAGES = ("grounding_s", "reranking_s", "matching_s")
# What may differ between the sides without their work differing: the LoRA's bytes
# (and so the images, and which seeds the reranker keeps) are the same only when
# training is bitwise reproducible across processes.
OUTPUT_FIELDS = ("lora_sha256", "seeds")

Times = dict[str, float]


def _between(start: str, end: str) -> float:
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def _poll(http: httpx.Client, job_id: str) -> dict[str, Any]:
    while True:
        job: dict[str, Any] = http.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "canceled"):
            if job["status"] != "succeeded":
                raise SystemExit(f"job {job_id} {job['status']}: {job['error']}")
            return job
        time.sleep(POLL_S)


def stack_look(http: httpx.Client, steps: int) -> tuple[Times, LookWork, str]:
    """A look through the API: its times, its work, and the subject's token."""
    started = time.perf_counter()
    files = [("photos", (p.name, p.read_bytes(), "image/jpeg")) for p in PHOTOS]
    subject = http.post("/v1/subjects", files=files, data={"class_noun": CLASS_NOUN}).json()
    uploaded = time.perf_counter()
    train = http.post(f"/v1/subjects/{subject['id']}/train", json={"steps": steps}).json()
    body = {"subject_id": subject["id"], "prompt": PROMPT, "seed": SEED}
    gen = http.post("/v1/generations", json=body).json()
    assert gen["depends_on"] == train["id"]
    train_done, gen_done = _poll(http, train["id"]), _poll(http, gen["id"])
    for output in gen_done["outputs"]:
        http.get(output["url"]).raise_for_status()
    total = time.perf_counter() - started
    times = {
        "upload_s": uploaded - started,
        # created -> claimed by the worker: scheduler poll + arq hop + claim.
        "train_queue_s": _between(train_done["created_at"], train_done["started_at"]),
        "train_s": _between(train_done["started_at"], train_done["finished_at"]),
        # prerequisite done -> dependent claimed: how fast a waiting job is released.
        "generate_queue_s": _between(train_done["finished_at"], gen_done["started_at"]),
        "generate_s": _between(gen_done["started_at"], gen_done["finished_at"]),
        **gen_done["result"]["timings"],  # the generate job's stages
        "look_s": total,
    }
    times["shop_s"] = sum(times[stage] for stage in SHOP_STAGES)
    return times, _stack_work(train_done["result"], gen_done["result"]), subject["token"]


def _stack_work(trained: dict[str, Any], generated: dict[str, Any]) -> LookWork:
    return LookWork(
        steps=trained["steps"],
        prior_preservation=trained["prior_preservation"],
        class_images=trained["class_images"],
        candidates=generated["candidates"],
        kept=len(generated["output_ids"]),
        grounded=tuple(p["product_id"] for p in generated["grounding"]["products"]),
        prompt=generated["prompt"],
        look_items=generated["look_items"],
        lora_sha256=generated["lora_sha256"],
        seeds=tuple(generated["seeds"]),
    )


def direct_look(direct: DirectLook, token: str, steps: int) -> tuple[Times, LookWork]:
    times, work = direct.look(token, PROMPT, steps, SEED)
    times["generate_s"] = times["look_s"] - times["train_s"]  # what the generate job does
    times["shop_s"] = sum(times[stage] for stage in SHOP_STAGES)
    return times, work


def differences(stack: LookWork, direct: LookWork) -> dict[str, tuple[Any, Any]]:
    """Fields of the two looks' work that differ: (stack's, direct's)."""
    a, b = dataclasses.asdict(stack), dataclasses.asdict(direct)
    return {name: (a[name], b[name]) for name in a if a[name] != b[name]}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.look_tiny")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=get_profile("tiny").train_steps)
    parser.add_argument("--database", default="atelier_bench_look")
    parser.add_argument("--redis-db", type=int, default=11)
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--shop-port", type=int, default=8711, help="for the first crawl")
    args = parser.parse_args()

    bench_environment(args, BENCH_DIR)
    settings = get_settings()
    asyncio.run(migrate(settings))
    key = asyncio.run(_new_key(settings))
    if not asyncio.run(catalog_products(settings)):
        crawl_and_embed(key, args.port, args.shop_port)
    direct = DirectLook(settings, PHOTOS, CLASS_NOUN, BENCH_DIR / "direct-blobs")
    stack = Stack(args.port)
    try:
        direct.load_catalog()
        classes, classes_s = direct.prepare_class_images()
        print(f"direct: {classes} class images made in {classes_s:.1f}s (once, not timed)")
        stack.start()
        record = measure(direct, stack, key, args)
    finally:
        stack.stop()
        restore_signals()
        direct.close()
    record["products_in_index"] = asyncio.run(catalog_products(settings))
    report(record, args)


def measure(direct: DirectLook, stack: Stack, key: str, args: argparse.Namespace) -> dict[str, Any]:
    base = f"http://127.0.0.1:{args.port}"
    headers = {"Authorization": f"Bearer {key}"}
    runs: dict[str, list[Times]] = {"stack": [], "direct": []}
    works: list[dict[str, Any]] = []
    with httpx.Client(base_url=base, headers=headers, timeout=HTTP_TIMEOUT_S) as http:
        _wait_healthy(http, stack)
        # Warm-up: the worker loads its models and makes the class images once.
        _, _, token = stack_look(http, WARM_UP_STEPS)
        direct_look(direct, token, WARM_UP_STEPS)
        checkpoints_before = direct.checkpoints_written
        for _ in range(args.repeats):  # alternate, so drift hits both sides
            stack_times, stack_work, token = stack_look(http, args.steps)
            direct_times, direct_work = direct_look(direct, token, args.steps)
            runs["stack"].append(stack_times)
            runs["direct"].append(direct_times)
            works.append(
                {
                    "stack": dataclasses.asdict(stack_work),
                    "direct": dataclasses.asdict(direct_work),
                    "differences": differences(stack_work, direct_work),
                }
            )
    return {
        "runs": runs,
        "work": works,
        "torch_threads": torch.get_num_threads(),  # the direct side's; the worker's alike
        "direct_checkpoints_per_look": (direct.checkpoints_written - checkpoints_before)
        / args.repeats,
    }


ROWS = (
    ("upload_s", "upload (4 photos)"),
    ("train_queue_s", "train job: created -> claimed"),
    ("train_s", "training"),
    ("generate_queue_s", "generate job: train done -> claimed"),
    ("generate_s", "generate job"),
    ("load_s", "  load (LoRA, models, index)"),
    ("grounding_s", "  grounding"),
    ("generation_s", "  generation (candidates)"),
    ("reranking_s", "  reranking"),
    ("matching_s", "  matching"),
    ("saving_s", "  saving (blobs)"),
    ("shop_s", "shop the look (ground+rerank+match)"),
    ("look_s", "whole look"),
)


def _median(runs: list[Times]) -> Times:
    return {name: statistics.median(run[name] for run in runs) for name in runs[0]}


def _shares(runs: dict[str, list[Times]]) -> dict[str, float]:
    """Shop the look's share, the median over repeats of each run's share."""
    return {
        "stack_of_client_look": statistics.median(r["shop_s"] / r["look_s"] for r in runs["stack"]),
        "stack_of_train_and_generate_jobs": statistics.median(
            r["shop_s"] / (r["train_s"] + r["generate_s"]) for r in runs["stack"]
        ),
        "stack_of_generate_job": statistics.median(
            r["shop_s"] / r["generate_s"] for r in runs["stack"]
        ),
        "direct_of_look": statistics.median(r["shop_s"] / r["look_s"] for r in runs["direct"]),
        "direct_of_generate": statistics.median(
            r["shop_s"] / r["generate_s"] for r in runs["direct"]
        ),
    }


def report(record: dict[str, Any], args: argparse.Namespace) -> None:
    runs: dict[str, list[Times]] = record["runs"]
    med = {side: _median(rs) for side, rs in runs.items()}
    work = record["work"][0]["direct"]
    print(
        f"\nlook on the tiny profile, median of {args.repeats}: {work['steps']} training steps"
        f" (prior preservation {work['prior_preservation']}, {work['class_images']} class"
        f" images, {record['direct_checkpoints_per_look']:g} checkpoints),"
        f" {work['candidates']} candidates, {work['kept']} kept,"
        f" {work['look_items']} product links; {record['products_in_index']} products indexed\n"
    )
    print(f"{'measure':<38}{'stack s':>9}{'direct s':>10}{'stack/direct':>14}")
    for name, label in ROWS:
        stack, direct = med["stack"].get(name), med["direct"].get(name)
        cells = [f"{stack:>9.3f}" if stack is not None else f"{'-':>9}"]
        cells.append(f"{direct:>10.3f}" if direct is not None else f"{'-':>10}")
        ratio = f"{stack / direct:>14.2f}" if stack is not None and direct else f"{'-':>14}"
        print(f"{label:<38}{''.join(cells)}{ratio}")
    shares = _shares(runs)
    print()
    for name, share in shares.items():
        print(f"shop the look's share, {name.replace('_', ' ')}: {share:.1%}")
    mismatched = [w["differences"] for w in record["work"] if _work_differs(w["differences"])]
    same_outputs = not any(w["differences"] for w in record["work"])
    print(f"same work on both sides: {not mismatched}; identical LoRAs and kept seeds: "
          f"{same_outputs}")  # fmt: skip
    write_result(
        "look_tiny",
        {
            "steps": args.steps,
            "repeats": args.repeats,
            "same_work": not mismatched,
            "same_outputs": same_outputs,
            "median": med,
            "shop_share": shares,
            **record,
        },
    )
    if mismatched:
        raise SystemExit(f"the sides did different work: {mismatched}")


def _work_differs(found: dict[str, Any]) -> bool:
    return any(name not in OUTPUT_FIELDS for name in found)


if __name__ == "__main__":
    main()

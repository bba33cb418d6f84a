"""What the service costs on top of the model: a whole look through the stack vs. direct calls.

Side by side in one run, alternating, on the `tiny` profile (CPU):
- stack: the API (uvicorn), scheduler and a worker process; a subject upload and a
  generation that trains first, timed from the job rows (queue wait, train, generate)
  and from the client (request to 4 images on disk);
- direct: the same training steps and the same 4 images with core.ml called in this
  process on an already loaded pipeline, no database, no queue.
The ratio stack/direct is the price of durability, progress and scheduling.

    .venv/bin/python -m bench.look_tiny [--repeats 3] [--steps 40]

Prints a table and writes bench/results/look_tiny.json.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from datetime import datetime
from typing import Any

import httpx
from PIL import Image

from bench.results_file import write_result
from core.ml_runtime import offline_quiet_env

offline_quiet_env()

from core.ml.generate import (  # noqa: E402 (after the environment is set)
    GenerateParams,
    generate_images,
    instance_prompt,
    subject_prompt,
)
from core.ml.pipeline import load_pipeline, resolve_checkpoint  # noqa: E402
from core.ml.profiles import get_profile  # noqa: E402
from core.ml.train import TrainParams, train_dreambooth_lora  # noqa: E402
from core.settings import get_settings  # noqa: E402
from demo.__main__ import PHOTOS, Stack, _new_key, _wait_healthy  # noqa: E402

PROMPT = "a Harry Potter costume"
# How often the client polls a job, as a web frontend would.
POLL_S = 0.5


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


def stack_look(http: httpx.Client, steps: int) -> dict[str, float]:
    started = time.perf_counter()
    files = [("photos", (p.name, p.read_bytes(), "image/jpeg")) for p in PHOTOS]
    subject = http.post("/v1/subjects", files=files, data={"class_noun": "woman"}).json()
    uploaded = time.perf_counter()
    train = http.post(f"/v1/subjects/{subject['id']}/train", json={"steps": steps}).json()
    gen = http.post(
        "/v1/generations", json={"subject_id": subject["id"], "prompt": PROMPT, "seed": 1}
    ).json()
    assert gen["depends_on"] == train["id"]
    train_done, gen_done = _poll(http, train["id"]), _poll(http, gen["id"])
    for output in gen_done["outputs"]:
        http.get(output["url"]).raise_for_status()
    total = time.perf_counter() - started
    return {
        "upload_s": uploaded - started,
        # created -> claimed by the worker: scheduler poll + arq hop + claim.
        "train_queue_s": _between(train_done["created_at"], train_done["started_at"]),
        "train_s": _between(train_done["started_at"], train_done["finished_at"]),
        # prerequisite done -> dependent claimed: how fast a waiting job is released.
        "generate_queue_s": _between(train_done["finished_at"], gen_done["started_at"]),
        "generate_s": _between(gen_done["started_at"], gen_done["finished_at"]),
        "look_s": total,
    }


def direct_look(pipe: Any, steps: int) -> dict[str, float]:
    profile = get_profile("tiny")
    photos = [Image.open(p).convert("RGB") for p in PHOTOS]
    started = time.perf_counter()
    lora = train_dreambooth_lora(
        pipe,
        photos,
        instance_prompt("sks", "woman"),
        TrainParams.from_profile(profile, steps=steps),
        on_step=lambda *_: None,
        should_stop=lambda: False,
    )
    trained = time.perf_counter()
    params = GenerateParams(
        prompt=subject_prompt("sks", "woman", PROMPT),
        num_images=4,
        seed=1,
        steps=profile.inference_steps,
        guidance_scale=profile.guidance_scale,
        width=profile.resolution,
        height=profile.resolution,
    )
    generate_images(pipe, lora, params, on_step=lambda *_: None, should_stop=lambda: False)
    done = time.perf_counter()
    return {"train_s": trained - started, "generate_s": done - trained, "look_s": done - started}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.look_tiny")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=get_profile("tiny").train_steps)
    parser.add_argument("--port", type=int, default=8011)
    args = parser.parse_args()

    settings = get_settings()
    checkpoint = resolve_checkpoint(get_profile("tiny"), settings.models_dir, None)
    pipe = load_pipeline(checkpoint, "cpu", "float32")
    stack = Stack(args.port)
    stack.start()
    runs: dict[str, list[dict[str, float]]] = {"stack": [], "direct": []}
    try:
        key = asyncio.run(_new_key(settings))
        base = f"http://127.0.0.1:{args.port}"
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}) as http:
            _wait_healthy(http, stack)
            stack_look(http, 2)  # warm-up: the worker loads its pipeline once
            direct_look(pipe, 2)
            for _ in range(args.repeats):  # alternate, so drift hits both sides
                runs["stack"].append(stack_look(http, args.steps))
                runs["direct"].append(direct_look(pipe, args.steps))
    finally:
        stack.stop()
    report(runs, args)


def report(runs: dict[str, list[dict[str, float]]], args: argparse.Namespace) -> None:
    med = {
        side: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for side, rs in runs.items()
    }
    print(f"\nlook on the tiny profile, {args.steps} training steps + 4 images, median of "
          f"{args.repeats}\n")  # fmt: skip
    print(f"{'measure':<18}{'stack s':>10}{'direct s':>10}{'stack/direct':>14}")
    for name, value in med["stack"].items():
        direct = med["direct"].get(name)
        if direct:
            print(f"{name:<18}{value:>10.2f}{direct:>10.2f}{value / direct:>14.2f}")
        else:
            print(f"{name:<18}{value:>10.2f}{'-':>10}{'-':>14}")
    write_result(
        "look_tiny",
        {
            "steps": args.steps,
            "repeats": args.repeats,
            "median": med,
            "runs": runs,
        },
    )


if __name__ == "__main__":
    main()

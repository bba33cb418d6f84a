"""`python -m demo`: start the stack, fill the catalog, run one whole look (tiny profile).

Starts the API (uvicorn), the scheduler, a GPU worker on the CPU standing in for
an RTX 4090, a CPU worker (crawls) and the fixture shop (500 products, no added
latency), creates an admin API key, crawls the shop through
``POST /v1/admin/crawls`` and shows a few products, then uploads the bundled
sample subject and starts a look for a prompt through the typed client
(``client.AtelierClient``): training runs first, then 4 images are generated and
matched to products; it follows the look's event stream, prints a progress line
per change, where the images are and their products, and keeps the API up until
Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import httpx
from sqlmodel import col, select

from api.shop_schemas import LookItemOut
from client import AtelierClient, LookEvent
from core.accounts import create_account_with_key, create_key
from core.db.engine import make_engine, make_sessionmaker, session_scope
from core.db.models import Account
from core.settings import Settings, get_settings

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = sorted((ROOT / "demo" / "sample_subject").glob("*.jpg"))
DEFAULT_PROMPT = "my next Halloween costume for a Harry Potter themed party"
LOG_DIR = ROOT / "var" / "log"
OUT_DIR = ROOT / "var" / "demo"
SHOP_PRODUCTS = 500
DEMO_ACCOUNT = "demo"


def _command_line(child: subprocess.Popen[bytes]) -> str:
    """The child's command as one readable line (its args may be str, bytes or paths)."""
    args = child.args
    if isinstance(args, str | bytes | os.PathLike):
        return os.fsdecode(args)
    return " ".join(os.fsdecode(arg) for arg in args)


class Stack:
    """The Procfile's processes, as children of this one, logging to var/log."""

    def __init__(self, port: int, shop_port: int | None = None) -> None:
        """Without a shop port: no fixture shop and no CPU worker (just the look)."""
        self.port = port
        self.shop_port = shop_port
        self.children: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.setdefault("ATELIER_PUBLIC_BASE_URL", f"http://127.0.0.1:{self.port}")
        commands = {
            "web": ["api", "serve", "--host", "127.0.0.1", "--port", str(self.port)],
            "scheduler": ["scheduler"],
            "gpu": ["worker", "gpu", "--device", "cpu", "--name", "rtx4090", "--vram", "24GiB"],
        }
        if self.shop_port is not None:
            # The "fixture" site entry, pointed at the shop started here.
            env.setdefault("ATELIER_CRAWL_BASE_URLS", json.dumps({"fixture": self.shop_url}))
            shop = ["--port", str(self.shop_port), "--products", str(SHOP_PRODUCTS)]
            commands["cpu"] = ["worker", "cpu"]
            commands["shop"] = ["fixture_shop", *shop, "--latency-ms", "0"]
        for name, args in commands.items():
            log = open(LOG_DIR / f"{name}.log", "ab")
            cmd = [sys.executable, "-m", *args]
            # As the Procfile's web line: one BLAS thread serves search faster
            # (docs/benchmarks.md, "Product search latency from an HTTP client").
            child_env = {**env, "OPENBLAS_NUM_THREADS": "1"} if name == "web" else env
            # A session of their own: Ctrl-C reaches only this process, which then
            # stops the children in order instead of racing them.
            child = subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=child_env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            self.children.append(child)
            print(f"started {name:<9} {' '.join(args)}  (log: var/log/{name}.log)")

    @property
    def shop_url(self) -> str:
        return f"http://127.0.0.1:{self.shop_port}"

    def check(self) -> None:
        for child in self.children:
            if child.poll() is not None:
                raise SystemExit(f"a process exited ({_command_line(child)}); see var/log/")

    def stop(self) -> None:
        # A second Ctrl-C or SIGTERM while stopping (a terminal sends SIGINT to the
        # whole process group; supervisors repeat TERM) must not leave children behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for child in self.children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in self.children:
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()


async def _new_key(settings: Settings) -> str:
    """A new key of the demo's admin account (made by the first demo): it starts
    crawls (admin) and makes looks, and sees the jobs of earlier demos."""
    engine = make_engine(settings)
    try:
        async with session_scope(make_sessionmaker(engine)) as session:
            query = select(Account.id).where(
                col(Account.name) == DEMO_ACCOUNT, col(Account.is_admin)
            )
            account_id = (await session.exec(query.order_by(col(Account.created_at)))).first()
            if account_id is None:
                return (await create_account_with_key(session, DEMO_ACCOUNT, is_admin=True)).key
            return (await create_key(session, account_id)).key
    finally:
        await engine.dispose()


def _wait_healthy(http: httpx.Client, stack: Stack, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stack.check()
        with contextlib.suppress(httpx.TransportError):
            if http.get("/healthz").status_code == 200:
                return
        time.sleep(0.3)
    raise SystemExit("the API did not come up; see var/log/web.log")


def _follow(http: httpx.Client, stack: Stack, job_id: str, label: str) -> dict[str, Any]:
    """Poll a job, printing a line whenever its stage or step changes."""
    last = ""
    while True:
        stack.check()
        job = http.get(f"/v1/jobs/{job_id}").json()
        detail = job["progress_detail"]
        line = f"[{label}] {job['status']:<9} {job['stage']}"
        if "total" in detail:
            line += f" {detail['step']}/{detail['total']}"
        if "loss" in detail:
            line += f" loss={detail['loss']:.4f}"
        if "eta_s" in detail:
            line += f" eta {detail['eta_s']:.0f}s"
        if "products_new" in detail:
            line += f" · {detail['pages']:,} pages, {detail['products_new']:,} new products"
        if "total" in detail or "pages" not in detail:  # a first crawl has no total
            line += f" ({job['progress']:.0%})"
        if line != last:
            print(line, flush=True)
            last = line
        if job["status"] in ("succeeded", "failed", "canceled"):
            return dict(job)
        time.sleep(0.5)


def _wait_for_shop(stack: Stack, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stack.check()
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{stack.shop_url}/robots.txt").status_code == 200:
                return
        time.sleep(0.3)
    raise SystemExit("the fixture shop did not come up; see var/log/shop.log")


def run_crawl(http: httpx.Client, stack: Stack, *, wait: bool) -> None:
    """Crawl the fixture shop through the admin API, then show a few products."""
    _wait_for_shop(stack)
    started = time.monotonic()
    response = http.post("/v1/admin/crawls", json={"site": "fixture"})
    if response.status_code == 409:  # one is already waiting or running
        job_id = response.json()["job_id"]
        if http.get(f"/v1/jobs/{job_id}").status_code == 404:
            print(f"a crawl of the fixture shop is under way (job {job_id}, another account's)")
            return
    else:
        response.raise_for_status()
        job_id = response.json()["id"]
    if not wait:
        base_url = str(http.base_url).rstrip("/")
        print(f"crawl of the fixture shop started: {base_url}/v1/jobs/{job_id}")
        return
    done = _follow(http, stack, job_id, "crawl")
    if done["status"] != "succeeded":
        raise SystemExit(f"crawl {done['status']}: {done['error']}")
    r = done["result"]
    print(
        f"catalog crawled in {time.monotonic() - started:.1f}s: {r['pages']:,} pages, "
        f"{r['products_new']:,} new / {r['products_changed']:,} changed / "
        f"{r['products_gone']:,} gone products, {r['images_new']:,} new images, "
        f"errors {r['errors'] or 'none'}"
    )
    for p in http.get("/v1/products", params={"limit": 3, "available": "true"}).json()["items"]:
        print(f"  {p['designer']} · {p['name']} · {p['price']} {p['currency']}  {p['buy_url']}")
        print(f"    image {p['image_url']}")
    _follow_catalog_embedding(http, stack, r.get("followup_job_ids", []))


def _follow_catalog_embedding(http: httpx.Client, stack: Stack, job_ids: list[str]) -> None:
    """The crawl queued the catalog's embedding (and maybe a CLIP fine-tune): wait for
    the embedding, so the look is grounded in and matched to what was just crawled."""
    for job_id in job_ids:
        job = http.get(f"/v1/jobs/{job_id}").json()
        if job["kind"] == "catalog_embed":
            done = _follow(http, stack, job_id, "embed")
            if done["status"] != "succeeded":
                raise SystemExit(f"catalog embedding {done['status']}: {done['error']}")
            r = done["result"]
            print(
                f"catalog embedded: {r['images_embedded']:,} new image features,"
                f" {r['rows_written']:,} index rows for version {r['clip_model_id'][:8]}"
            )
        elif job["kind"] == "clip_finetune":
            print(f"a CLIP fine-tune is queued on the CPU worker: {job_id}")


def _event_line(event: LookEvent) -> str | None:
    """A progress line for a look's event (None for events not worth a line)."""
    data = event.data
    if event.name == "stage":
        return f"[look] stage {data['stage']}"
    if event.name != "progress" or data["status"] in ("succeeded", "failed", "canceled"):
        return None  # the look's summary follows
    detail = data["detail"]
    line = f"[look] {data['status']:<9} {data['stage']:<10} {data['progress']:.0%}"
    if "total" in detail:
        line += f" step {detail['step']}/{detail['total']}"
    if "loss" in detail:
        line += f" loss={detail['loss']:.4f}"
    if data["eta_s"] is not None:
        line += f" eta {data['eta_s']:.0f}s"
    return line


async def run_look(base_url: str, key: str, prompt: str) -> None:
    """The whole look through the typed client: photos, then one POST /v1/looks,
    followed live on its event stream."""
    async with AtelierClient(base_url, key) as atelier:
        photos = [(p.name, p.read_bytes()) for p in PHOTOS]
        subject = await atelier.create_subject(photos, class_noun="woman")
        print(f"subject {subject.id}: {subject.photo_count} photos, token '{subject.token}'")
        started = time.monotonic()
        look = await atelier.create_look(subject.id, prompt, num_images=4, seed=42)
        print(f"look {look.id}: {base_url}/v1/looks/{look.id}")
        last = None
        async for event in atelier.look_events(look.id):
            line = _event_line(event)
            if line and line != last:  # progress whose printed fields did not change
                print(line, flush=True)
                last = line
        done = await atelier.look(look.id)
        if done.status != "succeeded":
            raise SystemExit(f"look {done.status}: {done.error}")
        timings = ", ".join(f"{s.name} {s.seconds:.1f}s" for s in done.stages if s.seconds)
        print(f"look done in {time.monotonic() - started:.1f}s ({timings}): {done.spec.prompt!r}")
        out_dir = OUT_DIR / str(look.id)
        out_dir.mkdir(parents=True, exist_ok=True)
        for image in done.images:
            output = image.output
            path = out_dir / f"{output.seed}.png"
            path.write_bytes(await atelier.download(output.url))
            print(f"  {path.relative_to(ROOT)}  {output.url}  seed {output.seed}")
            _print_products(image.products)
    print(f"\ncurl -H 'Authorization: Bearer {key}' {base_url}/v1/looks/{look.id}")


async def _while_alive(stack: Stack, work: Coroutine[Any, Any, None]) -> None:
    """``work``, stopped with the reason if a process of the stack exits meanwhile
    (a stream would otherwise wait for a worker that is gone)."""

    async def watch() -> str:
        while True:
            try:
                stack.check()
            except SystemExit as exc:
                return str(exc)
            await asyncio.sleep(1)

    main, watcher = asyncio.ensure_future(work), asyncio.ensure_future(watch())
    await asyncio.wait({main, watcher}, return_when=asyncio.FIRST_COMPLETED)
    if not main.done():
        main.cancel()
        raise SystemExit(watcher.result())
    watcher.cancel()
    main.result()


# Products shown per image: the best of the whole image, then of each region.
PRODUCTS_SHOWN = 3


def _print_products(items: list[LookItemOut]) -> None:
    shown = [i for i in items if i.region == "whole"][:PRODUCTS_SHOWN]
    shown += [i for i in items if i.region != "whole" and i.rank == 0]
    for item in shown:
        p = item.product
        flag = " (sold out)" if item.sold_out else ""
        print(
            f"    {item.region:<5} {p.designer} · {p.name} · {p.price}"
            f" {p.currency}{flag}  {p.buy_url}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m demo")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--no-serve", action="store_true", help="exit after the look")
    parser.add_argument("--serve-only", action="store_true", help="start the stack, no look")
    parser.add_argument("--shop-port", type=int, default=8710, help="the fixture shop's port")
    parser.add_argument("--no-crawl", action="store_true", help="leave the catalog as it is")
    args = parser.parse_args(argv)

    settings = get_settings()
    base_url = f"http://127.0.0.1:{args.port}"
    # SIGTERM (a supervisor, `kill`) stops the stack as Ctrl-C does.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    stack = Stack(args.port, args.shop_port)
    stack.start()
    try:
        key = asyncio.run(_new_key(settings))
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=base_url, headers=headers, timeout=30) as http:
            _wait_healthy(http, stack)
            if not args.no_crawl:
                run_crawl(http, stack, wait=not args.serve_only)
        if not args.serve_only:
            asyncio.run(_while_alive(stack, run_look(base_url, key, args.prompt)))
        print(f"API key (admin): {key}")
        if not args.no_serve:
            print(f"\nAPI at {base_url}  (docs: {base_url}/docs). Ctrl-C to stop.")
            while True:
                stack.check()
                time.sleep(1)
    except KeyboardInterrupt:
        print("\nstopping")
    finally:
        stack.stop()


if __name__ == "__main__":
    main()

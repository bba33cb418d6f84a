"""Every Prometheus metric atelier exports, in one place.

The API process exports the request and job-creation metrics on ``/metrics``; a
worker exports job outcomes and durations on its own port. Scheduler metrics
live in the scheduler process.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Seconds: from fast API calls to long jobs.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_JOB_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)

HTTP_REQUESTS = Counter(
    "atelier_http_requests_total",
    "HTTP requests by route and status",
    ["method", "route", "status"],
)
HTTP_LATENCY = Histogram(
    "atelier_http_request_duration_seconds",
    "HTTP request latency by route",
    ["method", "route"],
    buckets=_LATENCY_BUCKETS,
)
JOBS_CREATED = Counter("atelier_jobs_created_total", "Jobs created, by kind", ["kind"])
JOBS_FINISHED = Counter(
    "atelier_jobs_finished_total", "Jobs that reached a final state", ["kind", "outcome"]
)
JOB_DURATION = Histogram(
    "atelier_job_duration_seconds",
    "Time a worker spent on one job attempt, by kind and outcome",
    ["kind", "outcome"],
    buckets=_JOB_BUCKETS,
)
JOBS_RUNNING = Gauge("atelier_worker_jobs_running", "Jobs this worker runs now")
JOBS_DISPATCHED = Counter("atelier_jobs_dispatched_total", "Jobs handed to the transport")
JOBS_REAPED = Counter(
    "atelier_jobs_reaped_total", "Orphaned jobs found by the reaper, by outcome", ["outcome"]
)
JOBS_REENQUEUED = Counter(
    "atelier_jobs_reenqueued_total", "Scheduled jobs re-sent because their message was lost"
)

# --- catalog crawler (exported by the CPU worker, or the CLI's process) --------------
_CRAWL_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600)
CRAWL_PAGES = Counter(
    "atelier_crawl_pages_total", "Pages fetched by the crawler, by site and HTTP status",
    ["site", "status"],
)  # fmt: skip
CRAWL_PRODUCTS = Counter(
    "atelier_crawl_products_total", "Products seen by a crawl, by site and change kind",
    ["site", "change"],
)  # fmt: skip
CRAWL_ERRORS = Counter(
    "atelier_crawl_errors_total", "Crawl errors, by site and kind", ["site", "kind"]
)
CRAWL_BYTES = Counter("atelier_crawl_bytes_total", "Bytes downloaded by the crawler", ["site"])
CRAWL_DURATION = Histogram(
    "atelier_crawl_duration_seconds", "Duration of whole crawls, by site and outcome",
    ["site", "outcome"], buckets=_CRAWL_BUCKETS,
)  # fmt: skip

# --- the GPU fleet (scheduler: placement; GPU workers: their own device) --------------
_TICK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
PLACEMENTS = Counter(
    "atelier_placements_total",
    "GPU placements by reason (affinity-lora-vram/-host/-disk, affinity-base, fit, next, too-big)",
    ["reason"],
)
QUEUE_DEPTH = Gauge(
    "atelier_queue_depth", "Jobs waiting to be placed or sent, by kind and priority",
    ["kind", "priority"],
)  # fmt: skip
QUEUE_WAIT = Histogram(
    "atelier_queue_wait_seconds",
    "From runnable to placed, by kind and priority",
    ["kind", "priority"],
    buckets=_JOB_BUCKETS,
)
SCHEDULER_TICK = Histogram(
    "atelier_scheduler_tick_seconds", "One scheduler tick (place, dispatch, reap, reconcile)",
    buckets=_TICK_BUCKETS,
)  # fmt: skip
GPU_VRAM = Gauge(
    "atelier_gpu_vram_bytes",
    "Per-GPU device memory as its worker published it: total, free, and reserved (the "
    "peaks of the jobs running or placed on it)",
    ["worker", "state"],
)
WORKERS_GONE = Counter("atelier_workers_gone_total", "GPU workers whose heartbeat stopped")
OOM_RETRIES = Counter(
    "atelier_oom_retries_total", "Attempts that ran out of device memory, by what followed",
    ["outcome"],
)  # fmt: skip
LORA_CACHE = Counter(
    "atelier_lora_cache_total",
    "A GPU worker's LoRA lookups by the tier that served them (vram, host, disk: hit; "
    "blob: miss) and LoRAs evicted because their subject was erased (all: erased)",
    ["tier", "event"],
)

"""Every setting atelier reads, in one class, from the environment.

Variables are prefixed ``ATELIER_`` (``ATELIER_BLOB_DIR``...), except the two
connection strings every tool already knows as ``DATABASE_URL`` and ``REDIS_URL``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ATELIER_", extra="ignore")

    # --- infrastructure -------------------------------------------------------
    database_url: str = Field(
        "postgresql+asyncpg://postgres@127.0.0.1:5432/atelier",
        validation_alias=AliasChoices("DATABASE_URL", "ATELIER_DATABASE_URL"),
    )
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("REDIS_URL", "ATELIER_REDIS_URL"),
    )
    blob_dir: Path = Path("var/blobs")
    # The blob store is the files under blob_dir unless blob_url names an S3 bucket
    # and prefix (s3://atelier/blobs). Unset S3 fields fall back to the AWS
    # environment (AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID...).
    blob_url: str | None = None
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None
    public_base_url: str = "http://127.0.0.1:8000"

    # --- models -----------------------------------------------------------------
    # The default profile, and the others this deployment also serves: a request
    # may name any of them; a GPU worker loads each base pipeline on demand and
    # evicts the least recently used one when its VRAM requires.
    profile: str = "tiny"
    profiles: list[str] = Field(default_factory=list)
    # Where checkpoints live: <models_dir>/<profile> unless model_path names one.
    models_dir: Path = Path("var/models")
    model_path: Path | None = None
    device: str = "cpu"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    # The GPU worker's device memory (set from its --vram): the budget its resident
    # base pipelines share (0 = never evict one).
    device_vram_bytes: int = Field(0, ge=0)
    # Steps for a training job when the request does not say (0 = the profile's).
    train_steps: int = Field(0, ge=0)
    # LoRA cache of a worker: adapters resident in the pipeline (each costs its
    # weights in device memory, SD 1.5 rank 8: 6.4 MB fp32; switching among them
    # ~0.2 ms) and parsed LoRAs in host RAM (512 MiB is ~80 SD 1.5 rank-8 LoRAs).
    lora_max_resident: int = Field(4, ge=1)
    lora_host_mib: int = Field(512, ge=0)
    # The third tier: LoRA files on the worker's local disk (LRU by bytes; 4 GiB is
    # ~640 SD 1.5 rank-8 LoRAs). A LoRA in any local tier is never fetched again.
    lora_disk_dir: Path = Path("var/lora-cache")
    lora_disk_mib: int = Field(4096, ge=0)
    # torch.compile the UNet and hotswap LoRAs into one slot (no recompilation per
    # user). Compiling costs minutes at the first generation; it pays off on GPUs.
    compile_unet: bool = False
    # Threads torch may use in a worker (0 = torch's default).
    torch_threads: int = Field(0, ge=0)
    # Training recipe overrides; None = the profile's value (core/ml/profiles.py).
    # DreamBooth prior preservation on/off, its loss weight (lambda) and how many
    # class images it trains against (generated once per profile and noun, cached).
    prior_preservation: bool | None = None
    prior_loss_weight: float | None = Field(None, ge=0)
    class_images: int | None = Field(None, ge=1)
    # Steps between resumable training checkpoints (0 = none).
    checkpoint_every: int | None = Field(None, ge=0)

    # --- uploads and requests ---------------------------------------------------
    min_photos: int = 3
    max_photos: int = 8
    max_photo_bytes: int = 15 * MiB
    # A decompression bomb is refused on its header, before any pixel is decoded.
    max_photo_pixels: int = 40_000_000
    # The shorter side a photo must have; the profile's ``min_crop_side`` raises it
    # (sd15 384, sdxl 768): a photo smaller than the crop it must give is refused.
    min_photo_side: int = 64
    # Stored photos are normalized so their longer side is at most this. Their
    # training crops are cut from the photo as uploaded, not from this copy.
    stored_photo_side: int = 1024
    # Training crops are stored with their side at most this, or the largest view
    # the profile encodes if that is more. 1152 px holds sdxl's largest (1024 px
    # enlarged by its crop jitter 0.1: 1128 px), so crops serve every profile.
    stored_crop_side: int = Field(1152, ge=1)
    # Each photo must show exactly one face whose box's side is at least this
    # fraction of the photo's shorter side.
    min_face_fraction: float = Field(0.1, gt=0, le=1)
    # The training crop is a square around the face, this many face-box sides wide.
    face_crop_scale: float = Field(3.0, ge=1)
    max_prompt_chars: int = 500
    max_images: int = 8
    max_train_steps: int = 5000
    # Subjects one training run may learn at once (``with_subjects`` plus the one
    # trained): each adds its photos to the run and shares its steps.
    max_subjects_per_run: int = Field(4, ge=1)

    # --- jobs ---------------------------------------------------------------------
    job_max_attempts: int = Field(3, ge=1)
    heartbeat_interval_s: float = 2.0
    # A running job whose heartbeat is older than this is considered orphaned.
    heartbeat_stale_s: float = 20.0
    scheduler_poll_s: float = 0.5
    # A scheduled job whose arq message vanished (Redis flushed) is re-enqueued
    # once it has been scheduled for this long without a worker claiming it.
    reconcile_grace_s: float = 5.0
    worker_concurrency: int = Field(1, ge=1)
    # --- GPU placement (core/fleet) ----------------------------------------------------
    # Expected peak VRAM and seconds per job shape, corrected online by finished jobs.
    cost_table: Path = Path(__file__).resolve().parent / "fleet" / "cost_table.json"
    # VRAM a GPU keeps free beside a job's expected peak (CUDA context, fragmentation).
    placement_margin_mib: int = Field(1024, ge=0)
    # Each aging_s waited is worth one priority level; generations start 10 ahead.
    placement_aging_s: float = Field(60.0, gt=0)
    placement_interactive_bonus: float = Field(10.0, ge=0)
    # While others wait, one account holds at most this share of the fleet's GPUs.
    placement_fair_share: float = Field(0.5, gt=0, le=1)
    # A busy GPU holding a generation's LoRA is worth waiting this long for.
    placement_affinity_wait_s: float = Field(10.0, ge=0)
    # Queued GPU jobs one placement round considers.
    placement_max_pending: int = Field(1000, ge=1)
    # A generation that waited this long with no GPU free takes one from a training
    # with more than preempt_min_remaining_s to go (0 = never preempt).
    placement_preempt_after_s: float = Field(60.0, ge=0)
    placement_preempt_min_remaining_s: float = Field(120.0, ge=0)
    # Prometheus ports of the worker and scheduler processes (0 = off).
    worker_metrics_port: int = 9101
    scheduler_metrics_port: int = 9102
    # Hard limit arq enforces on one task; our own heartbeat catches dead workers.
    job_timeout_s: int = 6 * 3600

    # --- catalog crawler ------------------------------------------------------------
    # Site entries (TOML, one per site) the crawler knows; see core/catalog/sites/.
    sites_dir: Path = Path(__file__).resolve().parent / "catalog" / "sites"
    # Sites the periodic crawl visits, and how often (0 = no periodic crawl).
    crawl_sites: list[str] = Field(default_factory=list)
    crawl_period_s: int = Field(6 * 3600, ge=0)
    # Overrides a site entry's base URL, e.g. the fixture shop's port in the demo:
    # ATELIER_CRAWL_BASE_URLS='{"fixture": "http://127.0.0.1:8710"}'.
    crawl_base_urls: dict[str, str] = Field(default_factory=dict)
    crawl_user_agent: str = "atelier-catalog-bot/0.1 (+https://github.com/atelier/atelier)"
    # Politeness: requests in flight per host, and the adaptive delay's bounds
    # (AutoThrottle-style: the delay tracks latency / target concurrency).
    crawl_concurrency_per_host: int = Field(8, ge=1)
    crawl_target_concurrency: float = Field(8.0, gt=0)
    crawl_min_delay_s: float = Field(0.0, ge=0)
    crawl_max_delay_s: float = Field(30.0, ge=0)
    crawl_timeout_s: float = Field(30.0, gt=0)
    crawl_retries: int = Field(3, ge=0)
    crawl_backoff_s: float = Field(0.5, ge=0)  # first retry's delay; doubles, with jitter
    # Caps, before and after decompression.
    crawl_max_page_bytes: int = 5 * MiB
    crawl_max_image_bytes: int = 20 * MiB
    crawl_images_per_product: int = Field(5, ge=1)
    # A complete crawl marks the products it did not see gone, unless they are more
    # than this fraction of the site's live products: that is a broken site entry
    # (selectors that no longer match) or a broken shop, not a season's end.
    crawl_max_gone_fraction: float = Field(0.5, gt=0, le=1)
    # Download and pad product images (off only for benchmarks of page crawling).
    crawl_images: bool = True
    # A site entry with trust_sitemap_lastmod skips product pages whose sitemap
    # <lastmod> is not newer than what we hold, unless we last read them longer
    # ago than this: a shop whose lastmods lie is still caught.
    crawl_revalidate_after_s: int = Field(7 * 24 * 3600, ge=0)
    # Page outcomes are written in batches of up to this many pages, or what came
    # within this many seconds, one transaction each.
    crawl_write_batch: int = Field(50, ge=1)
    crawl_write_batch_s: float = Field(0.1, gt=0)
    # Catalog images are padded onto a square of this side.
    catalog_image_side: int = 512
    # The CPU worker's Prometheus port (0 = off).
    cpu_worker_metrics_port: int = 9103
    # Jobs a CPU worker runs at once: crawls are I/O-bound, so crawls of different
    # sites overlap, and the periodic-crawl tick never waits behind a long crawl.
    cpu_worker_jobs: int = Field(4, ge=1)

    # --- shop the look ----------------------------------------------------------------
    # The fashion CLIP: a core.ml.fashion_clip.profiles key, and where its weights are
    # (a directory with open_clip_config.json and the weights, or the weights file);
    # default <models_dir>/clip-<profile>. Never downloaded at run time.
    clip_profile: str = "tiny"
    clip_model_path: Path | None = None
    # Candidates generated per look to keep the best num_images: 6 for 4 kept costs
    # 1.5x the denoising of 4 and gives the reranker two to drop.
    look_candidates: int = Field(6, ge=1)
    max_candidates: int = Field(12, ge=1)
    # Reranking: weights of prompt match (CLIP-T), catalog match and likeness to the
    # subject's photos in a candidate's combined score.
    rerank_prompt_weight: float = Field(1.0, ge=0)
    rerank_catalog_weight: float = Field(1.0, ge=0)
    rerank_likeness_weight: float = Field(1.0, ge=0)
    # Grounding: enrich the prompt with this many best-matching in-stock products.
    grounding: bool = True
    grounding_products: int = Field(2, ge=1)
    # Shop-the-look: in-stock products matched per image and garment region.
    products_per_image: int = Field(5, ge=1)
    # A process holding the catalog index checks Postgres for a changed catalog or
    # version at most this often (results are re-checked for stock either way).
    index_check_s: float = Field(2.0, ge=0)
    # A crawl that made more than this share of the site's live products new or
    # changed queues a clip_finetune job (1 = never).
    clip_finetune_after_change: float = Field(0.2, gt=0, le=1)
    # Fine-tuning the heads: steps, batch (distinct products), learning rate (None:
    # the CLIP profile's, core/ml/fashion_clip/profiles.py), and the share of
    # products held out to judge a version against the active one.
    clip_finetune_steps: int | None = Field(None, ge=1)
    clip_finetune_batch: int | None = Field(None, ge=2)
    clip_finetune_lr: float | None = Field(None, gt=0)
    clip_holdout_fraction: float = Field(0.2, gt=0, lt=1)
    # Last blocks of the image / text tower unfrozen by default (0: heads only, no
    # tower forward pass; more recomputes the towers on every step).
    clip_unfreeze_image_blocks: int = Field(0, ge=0)
    clip_unfreeze_text_blocks: int = Field(0, ge=0)
    # Uploaded search images: bytes and pixels (decided from the header).
    max_search_image_bytes: int = 10 * MiB
    max_search_query_chars: int = 200

    # --- the API: looks, polling, idempotency, media, contract ---------------------
    # Longest `?wait=` a long-poll may ask for, and the SSE stream's keep-alive
    # comment period (proxies drop connections silent for about a minute).
    max_wait_s: float = Field(60.0, gt=0)
    sse_keepalive_s: float = Field(15.0, gt=0)
    # Polling without a database read (api/conditional.py): how long a process
    # reuses a job's or look's rendering that no notification invalidated (what no
    # trigger announces, signed URLs' expiry, is at most this stale); 0: never.
    watched_cache_s: float = Field(1.0, ge=0)
    # How long a process trusts an API key it checked: a revoked key keeps working
    # this long in a process that saw it just before (core/accounts.py); 0: never.
    key_cache_s: float = Field(5.0, ge=0)
    # Idempotency-Key: how long a key's first response is replayed (Stripe: 24 h),
    # and how long a request holding a key may run before a retry may take it over
    # (a process that died mid-request never answers).
    idempotency_ttl_s: int = Field(24 * 3600, ge=60)
    idempotency_lease_s: float = Field(60.0, gt=0)
    # Media URLs an <img>/<video> tag loads without a bearer header: HMAC-SHA256 over
    # path and expiry with this key (unset: a random key generated once and kept in
    # Postgres, so every API process shares it), valid this long.
    url_signing_key: SecretStr | None = None
    signed_url_ttl_s: int = Field(3600, ge=1)
    # Origins a browser may call the API from (CORS); empty: none but the API's own.
    cors_origins: list[str] = Field(default_factory=list)
    # Seconds a client is told to wait (Retry-After) when Postgres or Redis is down.
    unavailable_retry_after_s: int = Field(5, ge=1)
    # Seconds to wait for a connection to Postgres (asyncpg's default is 60 s), for
    # Redis to connect or answer, and for each dependency /healthz checks, before
    # calling it down.
    database_connect_timeout_s: float = Field(5.0, gt=0)
    redis_timeout_s: float = Field(5.0, gt=0)
    health_check_timeout_s: float = Field(2.0, gt=0)
    # Connections a process keeps open to Postgres, and how many more it may open
    # under a burst. An API process serves tens of concurrent requests: below that,
    # requests queue for a connection or open new ones (bench/api_polling.py).
    database_pool_size: int = Field(20, ge=1)
    database_max_overflow: int = Field(10, ge=0)
    # Log lines as text or as one JSON object each (with request and job ids).
    log_format: Literal["text", "json"] = "text"

    @property
    def served_profiles(self) -> list[str]:
        """The default profile first, then the others served, each once."""
        return list(dict.fromkeys([self.profile, *self.profiles]))


@lru_cache
def get_settings() -> Settings:
    return Settings()

"""CLIP-T of a look's kept images with and without grounding and reranking, on fixed prompts.

    python -m core.ml.look_eval [--prompts core/ml/look_prompts.toml] [--shop-products 500]
        [--heads-steps N] [--seed 42] [--candidates N] [--keep 4] [--steps N]
        [--judge base|version|vit-l-14] [--judge-path P] [--threads N] [--json OUT]

Four arms per prompt, {grounding off, on} x {reranking off, on}, on the SD profile
and the fashion CLIP profile from settings (``ATELIER_PROFILE``,
``ATELIER_CLIP_PROFILE``; tiny on CPU). Per grounding setting the look's
``candidates`` images are generated once with seeds seed .. seed + N - 1 (image i
depends on its seed and prompt only, ``core.ml.generate``); reranking off keeps
the first ``keep`` in seed order (exactly the images a look of ``keep`` without
candidates would make), reranking on keeps the best ``keep`` by
``core.shop.look.rerank`` with the settings' weights. Grounding is the look's:
the user's prompt through the version's text tower, the nearest in-stock products'
descriptors appended within the text encoder's 77 tokens.

Judging: CLIP-T = 100 x cos(image, prompt) (the literature's CLIP score, not
clamped at 0, so a random model's negative values stay visible) against the
ORIGINAL user prompt, never the grounded one (grounding must earn its score on
what the shopper asked for). The judge is named by ``--judge`` and the report
says how it relates to the reranker (``look_eval_catalog.JUDGES``); the default
is the base towers without heads, on a real host ``vit-l-14`` is independent.

No subject: images come from the base model without a LoRA, so the reranker's
likeness term is 0 for every candidate. The catalog is the fixture shop's,
built in process (``look_eval_catalog.build_catalog``). Writes JSON through
``bench.results_file`` (bench/results/look_eval.json) or to ``--json``.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from core.ml.resident import offline_quiet_env

offline_quiet_env()  # before diffusers and open_clip import: nothing is ever downloaded

from core.errors import AtelierError  # noqa: E402
from core.jobs.specs import GenerationSpec  # noqa: E402
from core.ml.fashion_clip.runtime import ClipRuntime  # noqa: E402
from core.ml.generate import GenerateParams, generate_images  # noqa: E402
from core.ml.look_eval_catalog import (  # noqa: E402
    JUDGES,
    NO_FILTERS,
    ShopCatalog,
    build_catalog,
    ground,
    judge_encoder,
)
from core.ml.pipeline import load_pipeline, resolve_checkpoint  # noqa: E402
from core.ml.profiles import get_profile  # noqa: E402
from core.settings import Settings  # noqa: E402
from core.shop import look  # noqa: E402
from core.shop.grounding import GroundedPrompt  # noqa: E402
from core.shop.rerank import RerankWeights  # noqa: E402

PROMPTS_FILE = Path(__file__).with_name("look_prompts.toml")
DEFAULT_SEED = 42  # the demo's look: candidates from seeds 42-47
KEEP = int(GenerationSpec.model_fields["num_images"].default)  # a look keeps 4 images
SHOP_PRODUCTS = 500  # the demo's fixture shop
CLIP_SCORE_SCALE = 100.0  # CLIP-T is reported as 100 x cos, as CLIPScore is
SETTINGS = ("off", "on")
BASELINE = "grounding-off/rerank-off"
PROMPT_COLUMN = 44  # characters of a prompt shown in the per-prompt table
RANDOM_SD_NOTE = (
    "the {profile} SD profile has seeded random weights: its images are noise, so these "
    "figures only exercise the path (grounding, candidates, reranking, judging); on a real "
    "host the same command prints the real table"
)


def arm_name(grounding: str, rerank: str) -> str:
    return f"grounding-{grounding}/rerank-{rerank}"


ARMS = tuple(arm_name(g, r) for g in SETTINGS for r in SETTINGS)


@dataclass(frozen=True)
class LookConfig:
    candidates: int
    keep: int
    seed: int
    steps: int  # denoising steps per image
    guidance_scale: float
    side: int
    grounding_products: int
    weights: RerankWeights


def load_prompts(path: Path = PROMPTS_FILE) -> list[str]:
    with path.open("rb") as file:
        prompts = tomllib.load(file)["prompts"]
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError(f"{path}: `prompts` must be a non-empty list of texts")
    return [" ".join(p.split()) for p in prompts]


def _never() -> bool:
    return False


def _ignore(_done: int, _total: int) -> None:
    return None


def _candidates(pipe: Any, prompt: str, config: LookConfig) -> list[Image.Image]:
    params = GenerateParams(
        prompt=prompt, num_images=config.candidates, seed=config.seed, steps=config.steps,
        guidance_scale=config.guidance_scale, width=config.side, height=config.side,
    )  # fmt: skip
    images = generate_images(pipe, None, params, _ignore, _never)
    return [Image.open(io.BytesIO(image.png)).convert("RGB") for image in images]


def clip_t(judge: Any, images: Sequence[Image.Image], prompt: str) -> np.ndarray:
    """100 x cos(image, prompt) per image under the judge (its embeddings are normalised)."""
    text = judge.encode_texts([prompt])[0]
    return CLIP_SCORE_SCALE * (judge.encode_images(list(images)) @ text)


def _grounding_arm(
    pipe: Any,
    encoder: Any,
    catalog: ShopCatalog,
    judge: Any,
    user_prompt: str,
    grounded: GroundedPrompt,
    config: LookConfig,
) -> tuple[dict[str, Any], dict[str, list[int]], np.ndarray]:
    """One grounding setting of one prompt: its candidates, their judge scores, the
    reranker's order, and which candidates each rerank setting keeps."""
    images = _candidates(pipe, grounded.prompt, config)
    # The reranker's prompt match is against the user's prompt, as in the job.
    scores = look.rerank(
        encoder, images, user_prompt, [], catalog.index, NO_FILTERS, config.weights
    )
    judged = clip_t(judge, images, user_prompt)
    order = [s.index for s in scores]
    kept = {"off": list(range(config.keep)), "on": order[: config.keep]}
    detail = {
        "prompt": grounded.prompt,
        "tokens": grounded.tokens,
        "products": [
            {"product_id": p.product_id, "descriptor": p.descriptor, "score": round(p.score, 6)}
            for p in grounded.used
        ],
        "seeds": [config.seed + i for i in range(len(images))],
        "candidate_clip_t": [round(float(v), 4) for v in judged],
        "rerank_order": order,
        "rerank_scores": [{"candidate": s.index, **s.as_dict()} for s in scores],
    }
    return detail, kept, judged


def evaluate_prompt(
    pipe: Any,
    encoder: Any,
    catalog: ShopCatalog,
    judge: Any,
    prompt: str,
    config: LookConfig,
) -> dict[str, Any]:
    """The four arms of one prompt: mean judge CLIP-T of each arm's kept images."""

    def count_tokens(text: str) -> int:
        return len(pipe.tokenizer(text).input_ids)

    prompts = {
        "off": GroundedPrompt(prompt, [], count_tokens(prompt)),
        "on": ground(encoder, catalog, prompt, config.grounding_products, count_tokens),
    }
    record: dict[str, Any] = {"prompt": prompt, "grounding": {}, "arms": {}}
    for grounding in SETTINGS:
        detail, kept, judged = _grounding_arm(
            pipe, encoder, catalog, judge, prompt, prompts[grounding], config
        )
        record["grounding"][grounding] = detail
        for rerank in SETTINGS:
            record["arms"][arm_name(grounding, rerank)] = {
                "kept": kept[rerank],
                "kept_seeds": [config.seed + i for i in kept[rerank]],
                "clip_t": float(np.mean(judged[kept[rerank]])),
            }
    return record


def summarize(per_prompt: list[dict[str, Any]]) -> dict[str, dict[str, float | int]]:
    """Per arm: mean CLIP-T over prompts, its mean delta against (off, off), and how
    many prompts it scored above (off, off)."""
    baseline = np.array([p["arms"][BASELINE]["clip_t"] for p in per_prompt])
    summary: dict[str, dict[str, float | int]] = {}
    for arm in ARMS:
        scores = np.array([p["arms"][arm]["clip_t"] for p in per_prompt])
        summary[arm] = {
            "mean_clip_t": float(scores.mean()),
            "delta_vs_baseline": float((scores - baseline).mean()),
            "prompts_above_baseline": int((scores > baseline).sum()),
        }
    return summary


def evaluate_looks(
    pipe: Any,
    encoder: Any,
    catalog: ShopCatalog,
    judge: Any,
    prompts: Sequence[str],
    config: LookConfig,
    on_prompt: Callable[[int, int, str], None] | None = None,
) -> dict[str, Any]:
    """Every prompt's four arms and their summary (``summarize``)."""
    if not config.keep <= config.candidates:
        raise ValueError(f"keep ({config.keep}) must be at most candidates ({config.candidates})")
    per_prompt = []
    for done, prompt in enumerate(prompts):
        per_prompt.append(evaluate_prompt(pipe, encoder, catalog, judge, prompt, config))
        if on_prompt is not None:
            on_prompt(done + 1, len(prompts), prompt)
    return {"arms": summarize(per_prompt), "prompts": per_prompt}


def format_table(record: dict[str, Any]) -> str:
    judge, arms = record["judge"], record["arms"]
    lines = [
        f"CLIP-T (100 x cos with the user's prompt) of the {record['config']['keep']} kept of "
        f"{record['config']['candidates']} candidates, {len(record['prompts'])} prompts, "
        f"judge {judge['name']} ({judge['id']})",
        f"{'arm':<28}{'mean':>8}{'delta':>9}{'prompts above':>15}",
    ]
    for arm, row in arms.items():
        above = "-" if arm == BASELINE else f"{row['prompts_above_baseline']}"
        lines.append(f"{arm:<28}{row['mean_clip_t']:>8.2f}"
                     f"{row['delta_vs_baseline']:>+9.2f}{above:>15}")  # fmt: skip
    short = {arm: arm.replace("grounding-", "g-").replace("rerank-", "r-") for arm in ARMS}
    lines += ["", f"{'prompt':<{PROMPT_COLUMN}}" + "".join(f"{short[a]:>13}" for a in ARMS)]
    for item in record["prompts"]:
        text = item["prompt"][: PROMPT_COLUMN - 2]
        cells = "".join(f"{item['arms'][a]['clip_t']:>13.2f}" for a in ARMS)
        lines.append(f"{text:<{PROMPT_COLUMN}}{cells}")
    return "\n".join(lines)


def _config(args: argparse.Namespace, settings: Settings, profile: Any) -> LookConfig:
    return LookConfig(
        # As GenerationSpec.resolve: never fewer candidates than images kept.
        candidates=args.candidates or max(settings.look_candidates, args.keep),
        keep=args.keep,
        seed=args.seed,
        steps=args.steps or profile.inference_steps,
        guidance_scale=profile.guidance_scale,
        side=profile.resolution,
        grounding_products=settings.grounding_products,
        weights=RerankWeights(settings.rerank_prompt_weight, settings.rerank_catalog_weight,
                              settings.rerank_likeness_weight),
    )  # fmt: skip


def run(args: argparse.Namespace) -> dict[str, Any]:
    settings = Settings()
    profile = get_profile(settings.profile)
    prompts = load_prompts(args.prompts)
    started = time.perf_counter()
    runtime = ClipRuntime.load(settings)
    version, catalog = build_catalog(
        runtime, args.shop_products, heads_steps=args.heads_steps,
        holdout=settings.clip_holdout_fraction,
    )  # fmt: skip
    judge, judge_id = judge_encoder(
        args.judge, runtime, version, settings.models_dir, args.judge_path
    )
    path = resolve_checkpoint(profile, settings.models_dir, settings.model_path)
    pipe = load_pipeline(path, settings.device, settings.dtype, profile.family)
    config = _config(args, settings, profile)
    prepared = time.perf_counter()

    def progress(done: int, total: int, prompt: str) -> None:
        print(f"  [looks] {done}/{total} {prompt}", file=sys.stderr)

    report = evaluate_looks(pipe, version, catalog, judge, prompts, config, progress)
    notes = [
        "reranking off keeps the first candidates in seed order; on keeps the best by the "
        "reranker (prompt + catalog + likeness, settings' weights); no subject LoRA, so "
        "likeness is 0 for every candidate",
        f"judge: {JUDGES[args.judge]}",
    ]
    if profile.hub_id is None:  # built on this host by its builder: seeded random weights
        notes.insert(0, RANDOM_SD_NOTE.format(profile=profile.name))
    return {
        "profile": profile.name,
        "clip_profile": runtime.profile.name,
        "clip_base": runtime.base_id,
        "judge": {"name": args.judge, "id": judge_id, "relation": JUDGES[args.judge]},
        "config": asdict(config),
        "catalog": catalog.info,
        **report,
        "timings": {"prepare_s": prepared - started, "looks_s": time.perf_counter() - prepared},
        "notes": notes,
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m core.ml.look_eval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--prompts", type=Path, default=PROMPTS_FILE, help="a TOML prompt set")
    parser.add_argument("--shop-products", type=int, default=SHOP_PRODUCTS)
    parser.add_argument("--heads-steps", type=int, help="heads training (default: profile's)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="first candidate's seed")
    parser.add_argument("--candidates", type=int, help="default: ATELIER_LOOK_CANDIDATES")
    parser.add_argument("--keep", type=int, default=KEEP)
    parser.add_argument("--steps", type=int, help="denoising steps (default: the profile's)")
    parser.add_argument("--judge", choices=list(JUDGES), default="base")
    parser.add_argument("--judge-path", type=Path, help="vit-l-14: default <models>/clip-vit-l-14")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--json", type=Path, help="default: bench/results/look_eval.json")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        record = run(args)
    except AtelierError as exc:
        print(f"error: {exc.detail}", file=sys.stderr)
        return 2
    print(format_table(record))
    for note in record["notes"]:
        print(f"note: {note}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.json}")
    else:
        from bench.results_file import write_result

        write_result("look_eval", record)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Screen rare-token candidates on the base model: does "a photo of <token>" draw
anything in particular?

    python -m core.ml.token_screen --profile sd15 --out report.json
        [--tokens pfw,gge,...] [--controls vfx,gsm,...] [--images 4] [--steps N]
        [--seed 0] [--model-path P] [--device cuda] [--dtype float16]
        [--clip-model ViT-L-14] [--clip-weights P] [--random-weights]

Word counts (``core.rare_tokens``) miss what the image model learned from its
captions: DreamBooth (Ruiz et al. 2022, 4.1) warns that a token with a prior gets
entangled with the subject. For each token the base pipeline, without a LoRA,
draws ``--images`` images of "a photo of <token>" (seeds seed, seed + 1, ...),
and the same seeds draw a neutral baseline, "a photo". A CLIP judge
(``core.ml.eval_models``: ViT-L-14 by default, not the SD text encoder) scores

* alignment: mean cos(image, "a photo of <token>") of the token's images, minus
  the same for the baseline's: how much more the images look like what CLIP
  thinks the token means than images of nothing in particular;
* agreement: mean pairwise cos among the token's images, minus the same among
  the baseline's: a token with a prior draws the same kind of thing every seed.

A token is flagged when either passes its margin. The controls (acronyms
``core.rare_tokens`` rejects, with strong priors) are screened alongside: a
trustworthy run flags them, and their scores show the scale. A flagged
candidate belongs in ``core.rare_tokens.SCREEN_REJECTED``; then
``python -m core.rare_tokens`` derives the list again. On a profile built here
(tiny: random weights) the judge has random weights too and the numbers mean
nothing; the run proves the wiring.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from core.errors import AtelierError
from core.ml.eval_models import DEFAULT_CLIP_MODEL, MetricModels
from core.ml.generate import GenerateParams, generate_images
from core.ml.pipeline import load_pipeline, resolve_checkpoint
from core.ml.profiles import PROFILES, Profile, get_profile
from core.rare_tokens import RARE_TOKENS
from core.settings import Settings

TOKEN_PROMPT = "a photo of {token}"
BASELINE_PROMPT = "a photo"
DEFAULT_IMAGES = 4
# Acronyms with strong priors that core.rare_tokens rejects (the old list had them).
DEFAULT_CONTROLS = ("vfx", "gsm", "pnw", "ktm")
# Margins on cosine similarity (CLIP-T / 100). Starting points to calibrate against
# the controls of a real-host run, not measured values.
ALIGNMENT_MARGIN = 0.02
AGREEMENT_MARGIN = 0.05
RANDOM_NOTE = (
    "the {profile} profile has seeded random weights and so has the judge: these "
    "numbers mean nothing; the run proves the wiring"
)


@dataclass(frozen=True)
class ScreenConfig:
    images: int
    seed: int
    steps: int
    guidance_scale: float
    side: int
    alignment_margin: float = ALIGNMENT_MARGIN
    agreement_margin: float = AGREEMENT_MARGIN


@dataclass(frozen=True)
class TokenScore:
    token: str
    control: bool
    alignment: float
    agreement: float
    flagged: bool


def _draw(pipe: Any, prompt: str, config: ScreenConfig) -> list[Image.Image]:
    params = GenerateParams(
        prompt=prompt,
        num_images=config.images,
        seed=config.seed,
        steps=config.steps,
        guidance_scale=config.guidance_scale,
        width=config.side,
        height=config.side,
    )
    drawn = generate_images(pipe, None, params, lambda _done, _total: None, lambda: False)
    return [Image.open(io.BytesIO(image.png)).convert("RGB") for image in drawn]


def _unit(rows: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(rows.float(), dim=-1)


def mean_pairwise_cosine(embeddings: torch.Tensor) -> float:
    """Mean cosine over the distinct pairs of rows (0.0 for fewer than two)."""
    count = embeddings.shape[0]
    if count < 2:
        return 0.0
    unit = _unit(embeddings)
    similarity = unit @ unit.T
    off_diagonal = similarity.sum() - similarity.diagonal().sum()
    return float(off_diagonal / (count * (count - 1)))


def _text_cosine(images: torch.Tensor, text: torch.Tensor) -> float:
    return float((_unit(images) @ _unit(text).T).mean())


def screen_tokens(
    pipe: Any,
    judge: Any,
    tokens: Sequence[str],
    controls: Sequence[str],
    config: ScreenConfig,
) -> list[TokenScore]:
    """Each token's and control's scores against one baseline drawn with the same seeds."""
    baseline = judge.embed_images(_draw(pipe, BASELINE_PROMPT, config))
    baseline_agreement = mean_pairwise_cosine(baseline)
    scores = []
    for token in [*tokens, *controls]:
        prompt = TOKEN_PROMPT.format(token=token)
        drawn = judge.embed_images(_draw(pipe, prompt, config))
        text = judge.embed_texts([prompt])
        alignment = _text_cosine(drawn, text) - _text_cosine(baseline, text)
        agreement = mean_pairwise_cosine(drawn) - baseline_agreement
        flagged = alignment > config.alignment_margin or agreement > config.agreement_margin
        scores.append(TokenScore(token, token in controls, alignment, agreement, flagged))
        print(f"  [screen] {token}: alignment {alignment:+.4f} agreement {agreement:+.4f}",
              file=sys.stderr)  # fmt: skip
    return scores


def _token_list(text: str | None, default: Sequence[str]) -> list[str]:
    if text is None:
        return list(default)
    return [token.strip() for token in text.split(",") if token.strip()]


def run(args: argparse.Namespace) -> dict[str, Any]:
    settings = Settings()
    profile: Profile = get_profile(args.profile)
    random_weights = args.random_weights or profile.hub_id is None
    path = resolve_checkpoint(profile, settings.models_dir, args.model_path)
    device = args.device or settings.device
    pipe = load_pipeline(path, device, args.dtype or settings.dtype, profile.family)
    judge = MetricModels.from_env(
        clip_model=args.clip_model, clip_weights=args.clip_weights,
        random_weights=random_weights, device=device,
    ).clip()  # fmt: skip
    config = ScreenConfig(
        images=args.images,
        seed=args.seed,
        steps=args.steps or profile.inference_steps,
        guidance_scale=profile.guidance_scale,
        side=profile.resolution,
    )
    tokens = _token_list(args.tokens, RARE_TOKENS)
    controls = _token_list(args.controls, DEFAULT_CONTROLS)
    scores = screen_tokens(pipe, judge, tokens, controls, config)
    notes = [RANDOM_NOTE.format(profile=profile.name)] if random_weights else []
    return {
        "profile": profile.name,
        "checkpoint": str(path),
        "judge": {"clip_model": args.clip_model or DEFAULT_CLIP_MODEL, "random": random_weights},
        "prompts": {"token": TOKEN_PROMPT, "baseline": BASELINE_PROMPT},
        "config": asdict(config),
        "scores": [asdict(score) for score in scores],
        "flagged": [s.token for s in scores if s.flagged and not s.control],
        "controls_flagged": [s.token for s in scores if s.flagged and s.control],
        "notes": notes,
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m core.ml.token_screen",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--profile", choices=sorted(PROFILES), required=True)
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON report")
    parser.add_argument("--tokens", help="comma-separated (default: core.rare_tokens.RARE_TOKENS)")
    parser.add_argument(
        "--controls", help=f"comma-separated (default: {','.join(DEFAULT_CONTROLS)})"
    )
    parser.add_argument("--images", type=int, default=DEFAULT_IMAGES, help="images per prompt")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the profile's)")
    parser.add_argument("--seed", type=int, default=0, help="first image's seed")
    parser.add_argument("--model-path", type=Path, help="checkpoint (default: as settings)")
    parser.add_argument("--device", help="default: ATELIER_DEVICE")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--clip-model", help=f"open_clip model name (default {DEFAULT_CLIP_MODEL})")
    parser.add_argument("--clip-weights", type=Path, help="open_clip checkpoint file or directory")
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="a random-weight judge (implied for profiles built here)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        report = run(args)
    except AtelierError as exc:
        print(f"error: {exc.detail}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"flagged: {', '.join(report['flagged']) or 'none'}; controls flagged: "
        f"{len(report['controls_flagged'])}/{len(_token_list(args.controls, DEFAULT_CONTROLS))}"
    )
    for note in report["notes"]:
        print(f"note: {note}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

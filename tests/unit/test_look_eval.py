"""The look CLIP-T evaluation on the tiny profiles: which images each arm keeps, what
the judge scores them against, and that the report holds every arm of every prompt."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from core.ml import look_eval
from core.ml.fashion_clip.runtime import ClipRuntime, VersionEncoder
from core.ml.generate import GenerateParams
from core.ml.look_eval import ARMS, BASELINE, LookConfig, arm_name
from core.ml.look_eval_catalog import ShopCatalog, build_catalog, judge_encoder
from core.ml.pipeline import load_pipeline
from core.ml.profiles import get_profile
from core.settings import Settings
from core.shop.grounding import TEXT_ENCODER_TOKENS
from core.shop.rerank import RerankWeights

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PRODUCTS = 12  # the fewest a by-product split of the fixture shop takes comfortably
HEADS_STEPS = 3  # grounding needs a version, not a good one
PROMPT = "a navy linen summer wedding guest outfit"
# Longer than the text encoder reads: no descriptor fits, grounding changes nothing.
TOO_LONG = " ".join(["navy"] * TEXT_ENCODER_TOKENS)
TINY = get_profile("tiny")
# One denoising step: the arms' wiring does not depend on how good the images are.
CONFIG = LookConfig(
    candidates=4, keep=2, seed=42, steps=1, guidance_scale=TINY.guidance_scale,
    side=TINY.resolution, grounding_products=2, weights=RerankWeights(1.0, 1.0, 1.0),
)  # fmt: skip


@dataclasses.dataclass
class Shop:
    pipe: Any
    runtime: ClipRuntime
    version: VersionEncoder
    catalog: ShopCatalog


class RecordingJudge:
    """A judge that remembers every text it was asked to score against."""

    def __init__(self, encoder: VersionEncoder) -> None:
        self.encoder = encoder
        self.texts: list[str] = []

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        self.texts += texts
        return self.encoder.encode_texts(texts)

    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        return self.encoder.encode_images(images)


@pytest.fixture(scope="module")
def shop(settings: Settings, tiny_model_dir: Path, tiny_clip_dir: Path) -> Shop:
    runtime = ClipRuntime.load(settings)
    version, catalog = build_catalog(runtime, PRODUCTS, heads_steps=HEADS_STEPS, quiet=True)
    pipe = load_pipeline(tiny_model_dir, "cpu", "float32", TINY.family)
    return Shop(pipe, runtime, version, catalog)


@dataclasses.dataclass
class Evaluated:
    record: dict[str, Any]  # evaluate_prompt's record of PROMPT
    judged_texts: list[str]  # every text the judge scored against
    generated: list[GenerateParams]  # every generation asked for, in order


def evaluate(shop: Shop, judge: Any, prompt: str = PROMPT, **changes: Any) -> dict[str, Any]:
    config = dataclasses.replace(CONFIG, **changes)
    return look_eval.evaluate_prompt(shop.pipe, shop.version, shop.catalog, judge, prompt, config)


@pytest.fixture(scope="module")
def evaluated(shop: Shop) -> Iterator[Evaluated]:
    """PROMPT's four arms, judged by the base towers, with what the judge and the
    generator were asked (one evaluation shared: each costs 2 x candidates images)."""
    generated: list[GenerateParams] = []
    real = look_eval.generate_images

    def recording(pipe: Any, lora: Any, params: GenerateParams, *args: Any) -> Any:
        generated.append(params)
        return real(pipe, lora, params, *args)

    judge = RecordingJudge(shop.runtime.base_encoder())
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(look_eval, "generate_images", recording)
        yield Evaluated(evaluate(shop, judge), judge.texts, generated)


def test_rerank_off_keeps_the_first_seeds_and_on_keeps_the_rerankers_best(
    evaluated: Evaluated,
) -> None:
    record = evaluated.record
    first = list(range(CONFIG.keep))
    for grounding in look_eval.SETTINGS:
        detail = record["grounding"][grounding]
        judged = np.array(detail["candidate_clip_t"])
        off, on = (record["arms"][arm_name(grounding, r)] for r in ("off", "on"))
        assert off["kept"] == first
        assert off["kept_seeds"] == [CONFIG.seed + i for i in first]
        assert on["kept"] == detail["rerank_order"][: CONFIG.keep]
        assert on["kept_seeds"] == [CONFIG.seed + i for i in on["kept"]]
        combined = [s["combined"] for s in detail["rerank_scores"]]
        assert combined == sorted(combined, reverse=True)
        assert [s["candidate"] for s in detail["rerank_scores"]] == detail["rerank_order"]
        for arm in (off, on):
            assert arm["clip_t"] == pytest.approx(judged[arm["kept"]].mean(), abs=1e-3)


def test_the_judge_scores_against_the_users_prompt_never_the_grounded_one(
    evaluated: Evaluated,
) -> None:
    grounded = evaluated.record["grounding"]["on"]
    assert grounded["products"], "grounding found nothing: the test would prove nothing"
    assert grounded["prompt"] != PROMPT
    assert evaluated.judged_texts and set(evaluated.judged_texts) == {PROMPT}


def test_grounding_changes_only_the_prompt_the_candidates_come_from(
    evaluated: Evaluated,
) -> None:
    record = evaluated.record
    off, on = evaluated.generated
    assert off.prompt == PROMPT
    assert on.prompt == record["grounding"]["on"]["prompt"] != PROMPT
    assert dataclasses.replace(on, prompt=PROMPT) == off
    assert (off.seed, off.num_images) == (CONFIG.seed, CONFIG.candidates)
    assert record["grounding"]["off"]["seeds"] == record["grounding"]["on"]["seeds"]


def test_judged_by_the_rerankers_own_prompt_term_reranking_keeps_the_top_scores(
    shop: Shop,
) -> None:
    judge, _ = judge_encoder("version", shop.runtime, shop.version, Path("unused"), None)
    record = evaluate(shop, judge, weights=RerankWeights(1.0, 0.0, 0.0))
    for grounding in look_eval.SETTINGS:
        detail = record["grounding"][grounding]
        judged = np.array(detail["candidate_clip_t"])
        prompt_term = {s["candidate"]: s["prompt"] for s in detail["rerank_scores"]}
        for candidate, score in prompt_term.items():
            assert look_eval.CLIP_SCORE_SCALE * score == pytest.approx(judged[candidate], abs=1e-3)
        top = set(np.argsort(-judged)[: CONFIG.keep].tolist())
        on, off = (record["arms"][arm_name(grounding, r)] for r in ("on", "off"))
        assert set(on["kept"]) == top
        assert on["clip_t"] >= off["clip_t"]


def test_keep_more_than_candidates_is_refused(shop: Shop) -> None:
    config = dataclasses.replace(CONFIG, keep=CONFIG.candidates + 1)
    with pytest.raises(ValueError, match="keep"):
        look_eval.evaluate_looks(shop.pipe, shop.version, shop.catalog, None, [PROMPT], config)


def test_summary_compares_every_arm_with_the_ungrounded_unranked_look() -> None:
    scores = {  # two prompts' CLIP-T per arm
        "grounding-off/rerank-off": (1.0, 3.0),
        "grounding-off/rerank-on": (2.0, 3.0),
        "grounding-on/rerank-off": (0.0, 1.0),
        "grounding-on/rerank-on": (4.0, 5.0),
    }
    per_prompt = [{"arms": {a: {"clip_t": s[i]} for a, s in scores.items()}} for i in range(2)]
    summary = look_eval.summarize(per_prompt)
    assert summary[BASELINE] == {
        "mean_clip_t": 2.0, "delta_vs_baseline": 0.0, "prompts_above_baseline": 0,
    }  # fmt: skip
    assert summary["grounding-off/rerank-on"]["delta_vs_baseline"] == pytest.approx(0.5)
    assert summary["grounding-off/rerank-on"]["prompts_above_baseline"] == 1  # a tie is not above
    assert summary["grounding-on/rerank-off"]["mean_clip_t"] == pytest.approx(0.5)
    assert summary["grounding-on/rerank-on"]["prompts_above_baseline"] == 2


def test_prompt_sets_are_non_empty_texts(tmp_path: Path) -> None:
    path = tmp_path / "prompts.toml"
    path.write_text('prompts = ["  a  red\\n dress ", "boots"]\n')
    assert look_eval.load_prompts(path) == ["a red dress", "boots"]
    for bad in ("prompts = []", 'prompts = ["ok", "  "]', "prompts = [1]"):
        path.write_text(bad + "\n")
        with pytest.raises(ValueError, match="prompts"):
            look_eval.load_prompts(path)
    assert len(look_eval.load_prompts()) >= 1  # the shipped set parses


@dataclasses.dataclass
class Command:
    prompts: list[str]
    record: dict[str, Any]  # the JSON it wrote
    table: str  # what it printed


@pytest.fixture(scope="module")
def command(
    settings: Settings,
    tiny_model_dir: Path,
    tiny_clip_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Command]:
    """``python -m core.ml.look_eval`` on two prompts, one grounding cannot extend."""
    folder = tmp_path_factory.mktemp("look-eval")
    prompts = [PROMPT, TOO_LONG]
    (folder / "prompts.toml").write_text(f"prompts = {json.dumps(prompts)}\n")
    out = folder / "look_eval.json"
    flags = {"--prompts": folder / "prompts.toml", "--shop-products": PRODUCTS,
             "--heads-steps": HEADS_STEPS, "--candidates": CONFIG.candidates,
             "--keep": CONFIG.keep, "--steps": CONFIG.steps, "--json": out}  # fmt: skip
    argv = [str(part) for flag in flags.items() for part in flag]
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
        for name, value in (("MODELS_DIR", str(settings.models_dir)), ("PROFILE", "tiny"),
                            ("CLIP_PROFILE", "tiny"), ("DEVICE", "cpu")):  # fmt: skip
            patch.setenv(f"ATELIER_{name}", value)
        assert look_eval.main(argv) == 0
    yield Command(prompts, json.loads(out.read_text()), printed.getvalue())


def test_the_command_writes_and_prints_every_arm_of_every_prompt(command: Command) -> None:
    record = command.record
    assert [p["prompt"] for p in record["prompts"]] == command.prompts
    assert set(record["arms"]) == set(ARMS)
    for item in record["prompts"]:
        assert set(item["arms"]) == set(ARMS)
        assert all(len(arm["kept"]) == CONFIG.keep for arm in item["arms"].values())
        for grounding in look_eval.SETTINGS:
            assert len(item["grounding"][grounding]["candidate_clip_t"]) == CONFIG.candidates
    assert (record["config"]["candidates"], record["config"]["keep"]) == (
        CONFIG.candidates, CONFIG.keep,
    )  # fmt: skip
    assert record["judge"]["name"] == "base"
    assert all(arm in command.table for arm in ARMS)
    assert all(p[: look_eval.PROMPT_COLUMN - 2] in command.table for p in command.prompts)


def test_a_prompt_grounding_cannot_extend_scores_the_same_either_way(command: Command) -> None:
    grounded, too_long = (p for p in command.record["prompts"])
    assert grounded["grounding"]["on"]["products"], "the other prompt was grounded"
    on, off = too_long["grounding"]["on"], too_long["grounding"]["off"]
    assert on["products"] == [] and on["prompt"] == TOO_LONG
    assert on["candidate_clip_t"] == off["candidate_clip_t"]
    for rerank in look_eval.SETTINGS:
        assert too_long["arms"][arm_name("on", rerank)] == too_long["arms"][arm_name("off", rerank)]

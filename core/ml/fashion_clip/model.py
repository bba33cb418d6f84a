"""The fashion CLIP model: a frozen open_clip base, two residual heads and a temperature.

The base is any open_clip CLIP read from local files only (``load_base``: a
Hugging Face style directory, the tiny one and a downloaded ViT-B-16 alike, or a
bare weights file of a built-in architecture). A *version* trains on top of it:

- ``ClipHeads``: a residual bottleneck adapter on each tower's output embedding,
  ``head(x) = x + up(gelu(down(x)))`` with ``up`` zero-initialised, so a fresh
  version embeds exactly as its base does (CLIP-Adapter, residual form), and a
  learnable temperature (log of the logit scale, as open_clip keeps it) starting
  from the base's. Embeddings are L2-normalised after the head.
- optionally the last N transformer blocks of either tower (``FashionClip``'s
  ``unfreeze_*_blocks``). Such a version gets a private copy of those blocks; every
  other base tensor stays shared, so the resident base is never modified.

A version's trainable state (heads, temperature, unfrozen blocks) serialises to
safetensors bytes plus a JSON config (``save_version_state``) and loads back onto a
base (``load_version_state``). Head-only versions are what makes a re-embed cheap:
the heads run over the base features stored per image (``core.ml.fashion_clip.features``).
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from core.ml.resident import offline_quiet_env

offline_quiet_env()  # before open_clip imports huggingface_hub: nothing is ever downloaded

import open_clip  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load as load_safetensors  # noqa: E402
from safetensors.torch import save as save_safetensors  # noqa: E402
from torch import nn  # noqa: E402

from core.errors import CheckpointMissing, InvalidInput  # noqa: E402
from core.ml.fashion_clip.profiles import OPEN_CLIP_CONFIG, ClipProfile, fetch_hint  # noqa: E402

VERSION_FORMAT = "atelier-fashion-clip/1"
# CLIP's initial temperature (Radford et al. 2021): logit scale 1 / 0.07.
DEFAULT_LOGIT_SCALE = math.log(1 / 0.07)
# CLIP-Adapter's reduction: the bottleneck is a quarter of the embedding width.
BOTTLENECK_REDUCTION = 4
_HASH_CHUNK = 1 << 20
IDENTITY_HASH_CHARS = 16  # 64 bits of sha256: plenty to tell checkpoints apart

Preprocess = Callable[[Image.Image], torch.Tensor]


# --- the base -----------------------------------------------------------------------------


def resolve_model_path(profile: ClipProfile, models_dir: Path, model_path: Path | None) -> Path:
    """Where ``profile``'s base is read from: ``model_path`` or ``<models_dir>/<model_dir>``."""
    return model_path if model_path is not None else models_dir / profile.model_dir


def weights_path(profile: ClipProfile, model_dir_or_file: Path) -> Path:
    """The weights file a checkpoint directory (or a bare file) is read from. open_clip's
    ``local-dir:`` picks open_clip_model.safetensors before open_clip_pytorch_model.bin;
    a profile's ``weights_file`` names the one its download holds."""
    path = Path(model_dir_or_file)
    return path / profile.weights_file if path.is_dir() else path


def _check_present(profile: ClipProfile, path: Path) -> None:
    if path.is_dir():
        wanted = [path / OPEN_CLIP_CONFIG, path / profile.weights_file]
    else:
        wanted = [path]
    missing = [str(p) for p in wanted if not p.is_file()]
    if missing:
        command = fetch_hint(profile, path if path.is_dir() or not path.suffix else path.parent)
        raise CheckpointMissing(
            f"no {profile.name!r} CLIP checkpoint at {path} (missing: {', '.join(missing)}); "
            f"fetch it with: {command}",
            profile=profile.name,
            looked_at=missing,
            command=command,
        )


def load_base(
    profile: ClipProfile, model_dir_or_file: Path, device: str | torch.device = "cpu"
) -> tuple[Any, Preprocess]:
    """The open_clip model (eval mode, every weight frozen) and its image preprocess.

    A directory holding ``open_clip_config.json`` (the tiny checkpoint, a Hugging Face
    download) is read as open_clip's ``local-dir:``; a bare weights file needs the
    profile's built-in architecture. Both go through ``create_model_and_transforms``.
    Missing files raise CheckpointMissing naming them and the fetch command.
    """
    path = Path(model_dir_or_file)
    _check_present(profile, path)
    if path.is_dir():
        name, pretrained = f"local-dir:{path}", None
    elif profile.open_clip_arch is not None:
        name, pretrained = profile.open_clip_arch, str(path)
    else:
        raise InvalidInput(
            f"CLIP profile {profile.name!r} loads from a directory holding {OPEN_CLIP_CONFIG}, "
            f"not a bare file ({path})",
            profile=profile.name,
        )
    model, _, preprocess = open_clip.create_model_and_transforms(
        name, pretrained=pretrained, device=device
    )
    model.eval()
    model.requires_grad_(False)
    return model, preprocess


def tokenizer_for(profile: ClipProfile) -> Any:
    """open_clip's tokenizer for the profile (bundled BPE; works offline)."""
    return open_clip.get_tokenizer(profile.tokenizer, context_length=profile.context_length)


@lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as weights:
        while chunk := weights.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def base_identity(profile: ClipProfile, model_dir_or_file: Path) -> str:
    """``<profile>:<sha256 prefix of the weights file>``: the key stored base features
    are filed under (features of another base are another key, never mixed)."""
    path = weights_path(profile, model_dir_or_file)
    _check_present(profile, Path(model_dir_or_file))
    stat = path.stat()
    digest = _sha256(str(path), stat.st_size, stat.st_mtime_ns)
    return f"{profile.name}:{digest[:IDENTITY_HASH_CHARS]}"


def base_embed_dim(base: Any) -> int:
    return int(base.visual.output_dim)


def base_logit_scale(base: Any) -> float:
    """The base's temperature, as open_clip stores it (log of the logit scale)."""
    return float(base.logit_scale.detach().reshape(-1)[0])


# --- heads --------------------------------------------------------------------------------


class ResidualAdapter(nn.Module):
    """``x + up(gelu(down(x)))``, ``up`` zero-initialised: the identity until trained."""

    def __init__(self, dim: int, bottleneck: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(F.gelu(self.down(x)))


def default_bottleneck(embed_dim: int) -> int:
    return max(1, embed_dim // BOTTLENECK_REDUCTION)


class ClipHeads(nn.Module):
    """What every version trains: an adapter per tower and the temperature."""

    def __init__(
        self,
        embed_dim: int,
        bottleneck: int | None = None,
        logit_scale: float = DEFAULT_LOGIT_SCALE,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.bottleneck = bottleneck or default_bottleneck(embed_dim)
        self.image_head = ResidualAdapter(embed_dim, self.bottleneck)
        self.text_head = ResidualAdapter(embed_dim, self.bottleneck)
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale)))

    def embed_images(self, features: torch.Tensor) -> torch.Tensor:
        """Base image features [N, D] -> normalised version embeddings [N, D]."""
        return F.normalize(self.image_head(features), dim=-1)

    def embed_texts(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_head(features), dim=-1)


# --- the whole model ----------------------------------------------------------------------


def _text_blocks_prefix(base: Any) -> tuple[str, int]:
    # open_clip's CLIP keeps the text transformer at the top; CustomTextCLIP under .text.
    tower = base.text if hasattr(base, "text") else base
    prefix = "text.transformer.resblocks" if hasattr(base, "text") else "transformer.resblocks"
    return prefix, len(tower.transformer.resblocks)


def _last_blocks(prefix: str, count: int, unfrozen: int, tower: str) -> list[str]:
    if not 0 <= unfrozen <= count:
        raise InvalidInput(f"cannot unfreeze {unfrozen} {tower} blocks of {count}")
    return [f"{prefix}.{index}." for index in range(count - unfrozen, count)]


def _with_private(base: Any, prefixes: list[str]) -> Any:
    """A copy of ``base`` whose parameters under ``prefixes`` are its own; all other
    tensors are the base's very objects (deepcopy's memo maps them to themselves)."""
    memo: dict[int, Any] = {}
    for name, tensor in [*base.named_parameters(), *base.named_buffers()]:
        if not name.startswith(tuple(prefixes)):
            memo[id(tensor)] = tensor
    return copy.deepcopy(base, memo)


class FashionClip(nn.Module):
    """A base plus a version: heads, temperature and optionally unfrozen last blocks."""

    def __init__(
        self,
        base: Any,
        heads: ClipHeads | None = None,
        *,
        bottleneck: int | None = None,
        unfreeze_image_blocks: int = 0,
        unfreeze_text_blocks: int = 0,
    ) -> None:
        super().__init__()
        text_prefix, text_count = _text_blocks_prefix(base)
        vision_count = len(base.visual.transformer.resblocks)
        self.unfrozen_prefixes = _last_blocks(
            "visual.transformer.resblocks", vision_count, unfreeze_image_blocks, "image"
        ) + _last_blocks(text_prefix, text_count, unfreeze_text_blocks, "text")
        self.unfreeze_image_blocks = unfreeze_image_blocks
        self.unfreeze_text_blocks = unfreeze_text_blocks
        if self.unfrozen_prefixes:
            base = _with_private(base, self.unfrozen_prefixes)
            for name, parameter in base.named_parameters():
                parameter.requires_grad_(name.startswith(tuple(self.unfrozen_prefixes)))
        self.base = base
        if heads is None:
            heads = ClipHeads(base_embed_dim(base), bottleneck, base_logit_scale(base))
        if heads.embed_dim != base_embed_dim(base):
            raise InvalidInput(
                f"heads of width {heads.embed_dim} do not fit a base of width "
                f"{base_embed_dim(base)}"
            )
        device = next(base.parameters()).device
        self.heads = heads.to(device)

    @property
    def embed_dim(self) -> int:
        return self.heads.embed_dim

    def block_parameters(self) -> list[nn.Parameter]:
        """The unfrozen tower blocks' parameters (empty for a head-only version)."""
        return [
            p
            for name, p in self.base.named_parameters()
            if name.startswith(tuple(self.unfrozen_prefixes))
        ]

    # Base features (tower outputs before normalisation) -> version embeddings.
    def embed_image_features(self, features: torch.Tensor) -> torch.Tensor:
        return self.heads.embed_images(features)

    def embed_text_features(self, features: torch.Tensor) -> torch.Tensor:
        return self.heads.embed_texts(features)

    # Raw inputs (preprocessed pixels, token ids) -> version embeddings, towers included.
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.embed_image_features(self.base.encode_image(pixels))

    def encode_texts(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_text_features(self.base.encode_text(token_ids))

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """What a version adds to its base, by name: heads, temperature, unfrozen blocks."""
        state = {f"heads.{k}": v for k, v in self.heads.state_dict().items()}
        for name, parameter in self.base.named_parameters():
            if name.startswith(tuple(self.unfrozen_prefixes)):
                state[f"base.{name}"] = parameter
        return state

    def version_config(self, base_identity: str | None = None) -> dict[str, Any]:
        return {
            "format": VERSION_FORMAT,
            "embed_dim": self.embed_dim,
            "bottleneck": self.heads.bottleneck,
            "unfreeze_image_blocks": self.unfreeze_image_blocks,
            "unfreeze_text_blocks": self.unfreeze_text_blocks,
            "base": base_identity,
        }


@dataclass(frozen=True)
class VersionState:
    """A serialised version: safetensors bytes and the JSON-able config to rebuild it."""

    weights: bytes
    config: dict[str, Any]


def save_version_state(
    model: FashionClip | ClipHeads, base_identity: str | None = None
) -> VersionState:
    """Serialise a version (heads alone are a head-only version)."""
    if isinstance(model, ClipHeads):
        state = {f"heads.{k}": v for k, v in model.state_dict().items()}
        config = {
            "format": VERSION_FORMAT,
            "embed_dim": model.embed_dim,
            "bottleneck": model.bottleneck,
            "unfreeze_image_blocks": 0,
            "unfreeze_text_blocks": 0,
            "base": base_identity,
        }
    else:
        state, config = model.trainable_state(), model.version_config(base_identity)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in state.items()}
    return VersionState(weights=save_safetensors(tensors), config=config)


def load_version_state(
    base: Any, weights: bytes, config: dict[str, Any], base_identity: str | None = None
) -> FashionClip:
    """Rebuild a version on ``base`` (frozen, for embedding). With ``base_identity``
    given, a version trained on another base is refused."""
    if config.get("format") != VERSION_FORMAT:
        raise InvalidInput(f"not a fashion CLIP version (format {config.get('format')!r})")
    trained_on = config.get("base")
    if base_identity and trained_on and trained_on != base_identity:
        raise InvalidInput(f"version was trained on base {trained_on}, not {base_identity}")
    model = FashionClip(
        base,
        bottleneck=int(config["bottleneck"]),
        unfreeze_image_blocks=int(config["unfreeze_image_blocks"]),
        unfreeze_text_blocks=int(config["unfreeze_text_blocks"]),
    )
    stored = load_safetensors(weights)
    expected = model.trainable_state()
    if set(stored) != set(expected):
        wrong = sorted(set(stored) ^ set(expected))[:5]
        raise InvalidInput(f"version state does not match its config (keys {wrong})")
    with torch.no_grad():
        for name, target in expected.items():
            target.copy_(stored[name])
    model.requires_grad_(False)
    return model.eval()

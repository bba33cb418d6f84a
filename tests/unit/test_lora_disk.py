"""The LoRA cache's disk tier (core/ml/lora_disk.py) on its own, torch-free: LRU by
bytes, atomic writes, recency across restarts, damaged files, two processes on
one directory. Then the three tiers together through a ``LoraCache`` on the tiny
checkpoint: lookup order, what each tier holds, eviction from all of them."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from core.ml.lora_disk import ORPHAN_TEMP_AGE_S, LoraDiskCache, LoraInventory

SIZE = 4096


def blob(seed: int, size: int = SIZE) -> tuple[str, bytes]:
    """Bytes shaped like a safetensors file (header length, header, data) and their sha."""
    header = b'{"__metadata__":{"seed":"%d"}}' % seed
    body = hashlib.sha256(str(seed).encode()).digest() * (size // 32)
    data = len(header).to_bytes(8, "little") + header + body
    data = data[:size] if len(data) >= size else data + b"\0" * (size - len(data))
    return hashlib.sha256(data).hexdigest(), data


def names(root: Path) -> set[str]:
    return {path.name for path in root.iterdir()} if root.exists() else set()


# --- the disk tier alone -----------------------------------------------------------------


def test_a_file_is_written_whole_under_its_sha_and_read_back_checked(tmp_path: Path) -> None:
    disk = LoraDiskCache(tmp_path / "loras", 10 * SIZE)
    sha, data = blob(1)
    assert disk.get(sha) is None and not (tmp_path / "loras").exists()  # no dir until a write
    assert disk.put(sha, data)
    assert names(disk.root) == {f"{sha}.safetensors"}  # no temp file left
    assert disk.path(sha).read_bytes() == data and disk.contains(sha)
    assert disk.get(sha) == data
    assert (disk.stats.hits, disk.stats.misses, disk.stats.writes) == (1, 1, 1)
    with pytest.raises(ValueError, match="do not match"):
        disk.put(blob(2)[0], data)
    with pytest.raises(ValueError, match="sha256"):
        disk.get("../../etc/passwd")
    assert disk.inventory() == LoraInventory(disk=(sha,), disk_bytes=SIZE)


def test_least_recently_used_files_go_first_once_past_the_budget(tmp_path: Path) -> None:
    disk = LoraDiskCache(tmp_path, int(2.5 * SIZE))
    (a, da), (b, db), (c, dc), (d, dd) = (blob(i) for i in range(4))
    disk.put(a, da)
    disk.put(b, db)
    assert disk.get(a) == da  # a is now more recent than b
    disk.put(c, dc)
    assert [e.sha256 for e in disk.entries()] == [a, c]  # b went
    disk.put(c, dc)  # already there: only marked used, not written again
    assert disk.stats.writes == 3
    disk.put(d, dd)
    assert [e.sha256 for e in disk.entries()] == [c, d]
    assert sum(e.nbytes for e in disk.entries()) <= disk.max_bytes
    assert disk.stats.evictions == 2
    big_sha, big = blob(9, 3 * SIZE)
    assert not disk.put(big_sha, big)  # larger than the whole budget: not kept
    assert [e.sha256 for e in disk.entries()] == [c, d]


def test_recency_and_files_survive_a_restart_and_a_smaller_budget(tmp_path: Path) -> None:
    first = LoraDiskCache(tmp_path, 10 * SIZE)
    shas = []
    for seed in range(4):
        sha, data = blob(seed)
        first.put(sha, data)
        shas.append(sha)
    assert first.get(shas[0]) is not None  # 0 is now the most recent
    restarted = LoraDiskCache(tmp_path, 10 * SIZE)
    assert [e.sha256 for e in restarted.entries()] == [*shas[1:], shas[0]]
    smaller = LoraDiskCache(tmp_path, 2 * SIZE)  # the budget shrank: trimmed at start
    assert [e.sha256 for e in smaller.entries()] == [shas[3], shas[0]]


def test_damaged_and_partial_files_are_never_served_and_are_removed(tmp_path: Path) -> None:
    disk = LoraDiskCache(tmp_path, 10 * SIZE)
    sha, data = blob(1)
    disk.put(sha, data)
    disk.path(sha).write_bytes(data[:-1] + b"x")  # same size, one byte flipped
    assert disk.get(sha) is None and not disk.path(sha).exists()
    assert disk.stats.corrupt == 1
    # What a crash leaves: an empty file under a name (no fsync), a cut one, and
    # temp files: one a dead writer left long ago, one being written right now.
    empty, cut = blob(2)[0], blob(3)
    (tmp_path / f"{empty}.safetensors").write_bytes(b"")
    (tmp_path / f"{cut[0]}.safetensors").write_bytes(cut[1][:20])
    old_temp, new_temp = tmp_path / f".{sha}.abc.tmp", tmp_path / f".{sha}.def.tmp"
    old_temp.write_bytes(data[:100])
    new_temp.write_bytes(data[:100])
    stale = time.time() - ORPHAN_TEMP_AGE_S - 60
    os.utime(old_temp, (stale, stale))
    (tmp_path / "README").write_text("not ours")
    restarted = LoraDiskCache(tmp_path, 10 * SIZE)
    assert names(tmp_path) == {new_temp.name, "README"}
    assert restarted.entries() == [] and restarted.stats.corrupt == 2


def test_a_budget_of_zero_turns_the_tier_off_and_empties_it(tmp_path: Path) -> None:
    sha, data = blob(1)
    LoraDiskCache(tmp_path, 10 * SIZE).put(sha, data)
    off = LoraDiskCache(tmp_path, 0)
    assert not off.enabled and names(tmp_path) == set()
    assert not off.put(sha, data) and off.get(sha) is None and not off.contains(sha)
    assert not LoraDiskCache(tmp_path / "never", 0).root.exists()


def test_evict_deletes_the_files_and_any_write_in_progress(tmp_path: Path) -> None:
    disk = LoraDiskCache(tmp_path, 10 * SIZE)
    (a, da), (b, db) = blob(1), blob(2)
    disk.put(a, da)
    disk.put(b, db)
    writing = tmp_path / f".{a}.xyz.tmp"  # another process's write of a, in flight
    writing.write_bytes(da)
    assert disk.evict([a, blob(3)[0]]) == [a]
    assert names(tmp_path) == {f"{b}.safetensors"}
    assert all(da not in path.read_bytes() for path in tmp_path.iterdir())
    assert disk.stats.erased == 1


def test_two_caches_on_one_directory_see_each_others_files(tmp_path: Path) -> None:
    one, two = LoraDiskCache(tmp_path, 10 * SIZE), LoraDiskCache(tmp_path, 10 * SIZE)
    sha, data = blob(1)
    one.put(sha, data)
    assert two.get(sha) == data  # written by one, a hit for two
    two.evict([sha])
    assert one.get(sha) is None and one.stats.misses == 1  # gone for both: a miss, no error


def _churn(root: str, seeds: range, budget: int) -> None:
    """One worker process: write and read LoRAs in a shared directory."""
    disk = LoraDiskCache(Path(root), budget)
    for seed in seeds:
        sha, data = blob(seed % 12)
        if disk.get(sha) is None:
            disk.put(sha, data)


def test_two_processes_sharing_a_directory_leave_it_whole_and_in_budget(tmp_path: Path) -> None:
    budget = 5 * SIZE
    spawn = multiprocessing.get_context("spawn")
    workers = [spawn.Process(target=_churn, args=(str(tmp_path), range(i, 400, 2), budget))
               for i in range(2)]  # fmt: skip
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    entries = LoraDiskCache(tmp_path, budget).entries()
    assert sum(e.nbytes for e in entries) <= budget
    assert all(name.endswith(".safetensors") for name in names(tmp_path))  # no temp left
    for entry in entries:
        data = (tmp_path / f"{entry.sha256}.safetensors").read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry.sha256


def test_the_disk_tier_and_the_erasure_helpers_import_no_torch() -> None:
    code = "import sys, core.ml.lora_disk, core.ml.resident; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


# --- the three tiers through a LoraCache (tiny checkpoint) -------------------------------


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from core.ml import tiny
    from core.ml.pipeline import load_pipeline

    path = tiny.build_tiny_checkpoint(tmp_path_factory.mktemp("disk-models") / "tiny")
    return load_pipeline(path, "cpu", "float32")


@pytest.fixture
def loras(pipe: Any) -> Iterator[list[Any]]:
    from tests.unit.test_ml_generation import lora_template, random_lora

    template = lora_template(pipe)
    yield [random_lora(template, seed) for seed in range(3)]
    if pipe.get_list_adapters():
        pipe.unload_lora_weights()


def test_lookup_goes_resident_then_host_then_disk_then_the_callers_bytes(
    pipe: Any, loras: list[Any], tmp_path: Path
) -> None:
    from core.ml.lora_cache import LoraCache, LoraNotCached, LoraWeights
    from tests.unit.test_ml_generation import unet_probe

    disk = LoraDiskCache(tmp_path, 64 * 2**20)
    cache = LoraCache(pipe, max_resident=1, disk=disk)
    lora = loras[0]
    assert cache.local(lora.sha256) is None
    cache.activate(lora)  # the caller's bytes: checked, parsed, written to disk
    expected = unet_probe(pipe)
    assert disk.path(lora.sha256).read_bytes() == lora.data
    assert cache.local(lora.sha256) == LoraWeights(lora.sha256, None)  # resident
    cache.activate(loras[1])
    assert cache.local(lora.sha256) == LoraWeights(lora.sha256, None)  # host RAM
    cache.clear()  # resident and host tiers gone, as after a restart
    from_disk = cache.local(lora.sha256)
    assert from_disk == LoraWeights(lora.sha256, lora.data, from_disk=True)
    cache.activate(from_disk)
    assert torch_equal(unet_probe(pipe), expected)
    assert cache.stats.disk_hits == 1 and disk.stats.writes == 2  # not written back
    # Evicted from RAM between local() and activate(): the disk still serves it.
    cache.clear()
    cache.activate(LoraWeights(lora.sha256, None))
    assert torch_equal(unet_probe(pipe), expected) and cache.stats.disk_hits == 2
    cache.clear()
    disk.evict([lora.sha256])
    with pytest.raises(LoraNotCached):
        cache.activate(LoraWeights(lora.sha256, None))
    cache.clear()


def test_bytes_that_fail_a_check_never_reach_the_disk(
    pipe: Any, loras: list[Any], tmp_path: Path
) -> None:
    import torch
    from safetensors.torch import save

    from core.errors import InvalidInput
    from core.ml.lora_cache import LoraCache, LoraWeights
    from tests.unit.test_ml_generation import lora_template

    disk = LoraDiskCache(tmp_path, 64 * 2**20)
    cache = LoraCache(pipe, disk=disk)
    with pytest.raises(InvalidInput, match="sha256"):
        cache.activate(LoraWeights(loras[1].sha256, loras[0].data))
    # The right keys, other widths: a LoRA of another base model. It parses, then
    # fails to load, and must not stay on disk either.
    wider = {k: torch.zeros(v.shape[0] + 8, v.shape[1]) for k, v in lora_template(pipe).items()}
    with pytest.raises(InvalidInput, match="does not fit"):
        cache.activate(LoraWeights.of(save(wider)))
    assert names(tmp_path) == set()
    cache.clear()


def test_inventory_and_evict_cover_every_tier(pipe: Any, loras: list[Any], tmp_path: Path) -> None:
    from core.ml.lora_cache import LoraCache
    from core.ml.lora_weights import state_dict_nbytes
    from tests.unit.test_ml_generation import lora_template, unet_probe

    size = state_dict_nbytes(lora_template(pipe))
    disk = LoraDiskCache(tmp_path, 64 * 2**20)
    cache = LoraCache(pipe, max_resident=2, disk=disk)
    for lora in loras:
        cache.activate(lora)
    a, b, c = (lora.sha256 for lora in loras)
    held = cache.inventory()
    assert (held.vram, held.host, held.disk) == ((b, c), (a, b, c), (a, b, c))
    assert (held.vram_bytes, held.host_bytes) == (2 * size, 3 * size)
    assert held.disk_bytes == sum(len(lora.data) for lora in loras)
    assert held.tiers() == {"vram": [b, c], "host": [a, b, c], "disk": [a, b, c]}
    slot_b = cache.adapter_name(b)
    cache.activate(loras[2])
    probe_c = unet_probe(pipe)

    assert cache.evict([a, b]) == sorted([a, b])
    left = cache.inventory()
    assert (left.vram, left.host, left.disk) == ((c,), (c,), (c,))
    assert slot_b not in pipe.get_list_adapters().get("unet", [])
    assert not disk.path(a).exists() and not disk.path(b).exists()
    assert all(lora.data not in p.read_bytes() for p in tmp_path.iterdir() for lora in loras[:2])
    cache.activate(loras[2])
    assert torch_equal(unet_probe(pipe), probe_c) and cache.stats.resident_hits == 2
    cache.activate(loras[0])  # an evicted LoRA comes back from the caller's bytes
    assert cache.stats.erased == 2
    cache.evict([a, c])  # every adapter of ours gone: the UNet is left pristine
    assert not any(pipe.get_list_adapters().values())


def test_the_worker_runtime_inventories_and_evicts_across_its_caches(
    pipe: Any, loras: list[Any], tmp_path: Path
) -> None:
    from core.ml.profiles import get_profile
    from core.ml.resident import evict_loras, lora_inventory, resident_lora_cache
    from core.settings import Settings

    settings = Settings(lora_disk_dir=tmp_path, lora_disk_mib=64)
    assert lora_inventory(settings).disk == ()
    cache = resident_lora_cache(settings, pipe, get_profile("tiny"))
    assert cache.disk is not None and cache.disk.root == tmp_path.resolve()
    cache.activate(loras[0])
    held = lora_inventory(settings)
    assert loras[0].sha256 in set(held.vram) & set(held.host) & set(held.disk)
    assert evict_loras(settings, [loras[0].sha256]) == [loras[0].sha256]
    assert loras[0].sha256 not in lora_inventory(settings).held()
    assert names(tmp_path) == set()
    cache.clear()


def torch_equal(left: Any, right: Any) -> bool:
    import torch

    return bool(torch.equal(left, right))

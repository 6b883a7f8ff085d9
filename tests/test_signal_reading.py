"""Reading teacher signals: a reader opens only the shards it gathers from, slices them without reading them
whole, and gives the tensors a whole-shard reference gives, bit for bit; a cloud cache's shards come through a
bounded local ShardCache (least recently used evicted first, checksummed as they arrive). The "bucket" here is
a local folder that ``fetch`` copies from, so the LRU runs on real files without a cloud."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flexkd import signals as sig
from flexkd.config import ConfigError
from flexkd.losses import TopK
from flexkd.storage import Store
from flexkd.workbench import open_workbench

from .test_signals import _build, _config

LAYERS = [1, 2]  # feature.layers=uniform:2 of the 2-layer fixture teacher


@pytest.fixture(scope="module")
def five(disk, tmp_path_factory):
    """A classification cache of 48 examples in 5 shards (10, 10, 10, 10, 8) and every example's length."""
    root = tmp_path_factory.mktemp("five")
    cfg = _config(disk, root, "classification", ["signals.shard_examples=10"])
    bp, manifest = _build(cfg)
    assert [r["count"] for r in manifest["shards"]] == [10, 10, 10, 10, 8]
    bench = open_workbench(cfg, need_teacher=False)
    lengths = [len(e["input_ids"]) for e in bench.encode_rows(bench.data.train)]
    return bp.folder, manifest, lengths


def _gather(reader, indices, lengths, temperature=1.0):
    return reader.gather(list(indices), [lengths[i] for i in indices], LAYERS, temperature, "cpu")


def _remote(folder, tmp_path, cache_gb, bucket=None):
    """A reader of ``bucket`` (default: the cache folder) whose shards come through a ShardCache in tmp_path."""
    bucket = bucket or folder
    return sig.SignalReader(
        str(bucket), cache_gb=cache_gb, cache_dir=str(tmp_path / "node"), fetch=Store(str(bucket)).chunks
    )


def _reference(folder, indices, lengths, temperature=1.0) -> dict:
    """The reader before memory mapping: every shard loaded whole, examples found through a dict."""
    manifest = json.loads(Path(folder, "manifest.json").read_text())
    where = {}
    for record in manifest["shards"]:
        tensors = load_file(Path(folder, record["file"]))
        for j in range(record["count"]):
            where[record["first"] + j] = (tensors, j)
    parts = []
    for i in indices:
        shard, j = where[i]
        parts.append(
            (shard, *shard["tok_offsets"][j : j + 2].tolist(), *shard["pos_offsets"][j : j + 2].tolist())
        )
    hidden = {}
    for layer in LAYERS:
        d = parts[0][0][f"hidden.{layer}"].shape[-1]
        out = torch.zeros(len(indices), max(lengths[i] for i in indices), d)
        for b, (shard, t0, t1, _, _) in enumerate(parts):
            out[b, : t1 - t0] = shard[f"hidden.{layer}"][t0:t1].float()
        hidden[layer] = out
    if "logits" in parts[0][0]:
        return {
            "hidden": hidden,
            "rows": torch.cat([s["logits"][p0:p1].float() for s, _, _, p0, p1 in parts]),
        }
    t = manifest["spec"]["temperatures"].index(temperature)
    rows = TopK(
        torch.cat([s["top_values"][p0:p1].float() for s, _, _, p0, p1 in parts]),
        torch.cat([s["top_indices"][p0:p1].long() for s, _, _, p0, p1 in parts]),
        torch.cat([s["tail"][p0:p1, t] for s, _, _, p0, p1 in parts]),
    )
    return {"hidden": hidden, "rows": rows}


def _assert_identical(a: dict, b: dict) -> None:
    assert a["hidden"].keys() == b["hidden"].keys()
    for layer in a["hidden"]:
        assert a["hidden"][layer].dtype == b["hidden"][layer].dtype == torch.float32
        assert torch.equal(a["hidden"][layer], b["hidden"][layer]), layer
    ra, rb = a["rows"], b["rows"]
    if isinstance(ra, TopK):
        assert isinstance(rb, TopK)
        for field in ("values", "indices", "tail"):
            x, y = getattr(ra, field), getattr(rb, field)
            assert x.dtype == y.dtype and torch.equal(x, y), field
        assert ra.indices.dtype == torch.long
    else:
        assert ra.dtype == rb.dtype == torch.float32 and torch.equal(ra, rb)


def _sizes(manifest) -> list[int]:
    return [r["bytes"] for r in manifest["shards"]]


def _present(tmp_path, manifest) -> set[int]:
    """Which shards (by position) are whole files in the node's ShardCache; asserts nothing half-written."""
    (folder,) = (tmp_path / "node").iterdir()  # one subfolder: the cache's key
    assert folder.name == manifest["key"]
    names = {p.name for p in folder.iterdir() if not p.name.endswith(".lock")}
    assert not any(n.endswith(".part") for n in names), names
    return {i for i, r in enumerate(manifest["shards"]) if r["file"] in names}


def _bytes_on_disk(tmp_path) -> int:
    return sum(p.stat().st_size for p in (tmp_path / "node").rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------------------


def test_a_reader_opens_only_the_shards_it_gathers_from(five, tmp_path):
    folder, manifest, lengths = five
    names = [r["file"] for r in manifest["shards"]]
    reader = sig.SignalReader(folder)
    assert reader.opened == set()  # start-up reads the manifest alone
    _gather(reader, [3, 27, 8], lengths)  # rows of shards 0 and 2
    assert reader.opened == {names[0], names[2]}
    _gather(reader, [47], lengths)
    assert reader.opened == {names[0], names[2], names[4]}
    # Through the ShardCache the same: only those shards are fetched.
    remote = _remote(folder, tmp_path, cache_gb=1.0)
    _gather(remote, [3, 27, 8], lengths)
    assert remote.opened == {names[0], names[2]} and _present(tmp_path, manifest) == {0, 2}
    assert remote.cache.fetched == 2
    with pytest.raises(ConfigError, match="no signals for training example 48"):
        reader.gather([48], [lengths[0]], LAYERS, 1.0, "cpu")


@pytest.mark.parametrize("task", ["classification", "instruction"])
def test_gathered_tensors_are_bit_identical_to_whole_shard_reads_local_or_fetched(disk, tmp_path, task):
    """Local memory-mapped slices, slices of fetched shards and whole loaded shards give the same bits
    (class logits; for the LM, top-k values, indices and the tail at each cached temperature)."""
    extra = ["signals.shard_examples=10"] + (["kd.top_k=4"] if task == "instruction" else [])
    cfg = _config(disk, tmp_path, task, extra)
    bp, _ = _build(cfg, temperatures=[1.0, 2.0] if task == "instruction" else None)
    bench = open_workbench(cfg, need_teacher=False)
    lengths = [len(e["input_ids"]) for e in bench.encode_rows(bench.data.train)]
    local = sig.SignalReader(bp.folder)
    remote = _remote(bp.folder, tmp_path, cache_gb=1.0)
    temperatures = [1.0, 2.0] if task == "instruction" else [1.0]
    for indices in ([0, 19, 20, 33, 47, 5], [9, 10], [44]):  # across shard boundaries, in no order
        for t in temperatures:
            want = _reference(bp.folder, indices, lengths, t)
            _assert_identical(_gather(local, indices, lengths, t), want)
            _assert_identical(_gather(remote, indices, lengths, t), want)
    if task == "instruction":
        with pytest.raises(ConfigError, match="^kd.temperature: 3 is not among"):
            _gather(local, [0], lengths, 3.0)


def test_the_shard_cache_keeps_at_most_its_limit_evicting_the_least_recently_used(five, tmp_path):
    folder, manifest, lengths = five
    sizes = _sizes(manifest)
    limit = 2.5 * sum(sizes) / len(sizes)
    assert sum(sorted(sizes)[-2:]) <= limit < sum(sorted(sizes)[:3])  # two shards fit, never three
    reader = _remote(folder, tmp_path, cache_gb=limit / 1e9)
    steps = [
        ([0], {0}),
        ([15], {0, 1}),
        ([25], {1, 2}),  # shard 0 was the least recently used
        ([15], {1, 2}),  # a hit: fetches nothing, and shard 1 is now the most recent
        ([35], {1, 3}),  # so shard 2 goes, not shard 1, though 1 came first
        ([45, 5], {4, 0}),  # one batch across two shards: both stay, the others go
        ([6], {4, 0}),
    ]
    for indices, present in steps:
        _gather(reader, indices, lengths)
        assert _present(tmp_path, manifest) == present, indices
        assert _bytes_on_disk(tmp_path) <= limit
    assert reader.cache.fetched == 6  # 0, 1, 2, 3, 4 and 0 again; the hits fetched nothing


def test_a_shard_another_reader_holds_is_not_evicted_and_a_fetched_shard_is_not_fetched_again(five, tmp_path):
    """Two readers on one ShardCache folder, as two processes of a node share it."""
    folder, manifest, lengths = five
    sizes = _sizes(manifest)
    limit = 2.5 * sum(sizes) / len(sizes)
    a = _remote(folder, tmp_path, cache_gb=limit / 1e9)
    b = _remote(folder, tmp_path, cache_gb=limit / 1e9)
    _gather(a, [0], lengths)  # a holds shard 0 until its next gather
    _gather(b, [5, 15], lengths)
    assert b.cache.fetched == 1 and _present(tmp_path, manifest) == {0, 1}  # shard 0 was there already
    _gather(b, [25], lengths)  # shard 0 is the least recently used, but a still reads it: shard 1 goes
    assert _present(tmp_path, manifest) == {0, 2}
    a.close()
    _gather(b, [35], lengths)
    assert _present(tmp_path, manifest) == {2, 3}  # shard 0, free now and the oldest, went
    assert _bytes_on_disk(tmp_path) <= limit


def test_a_cache_limit_below_one_batch_or_one_shard_is_a_one_line_error_naming_the_key(five, tmp_path):
    folder, manifest, lengths = five
    sizes = _sizes(manifest)
    small = 1.5 * max(sizes)
    assert sizes[0] + sizes[1] > small
    reader = _remote(folder, tmp_path, cache_gb=small / 1e9)
    _gather(reader, [0, 5], lengths)  # one shard: fits
    with pytest.raises(ConfigError) as err:
        _gather(reader, [5, 15], lengths)  # shards 0 and 1 at once: do not
    assert re.fullmatch(
        r"signals\.local_cache_gb: \S+ GB holds fewer shards than one batch needs \(\S+ GB\); raise it",
        str(err.value),
    ), str(err.value)
    with pytest.raises(ConfigError) as err:
        _remote(folder, tmp_path, cache_gb=0.5 * max(sizes) / 1e9)  # at init, before anything is fetched
    assert re.fullmatch(
        r"signals\.local_cache_gb: \S+ GB holds fewer shards than one batch needs \(the largest shard of \S+ "
        r"alone is \S+ GB\); raise it",
        str(err.value),
    ), str(err.value)
    with pytest.raises(ConfigError, match="^signals.local_cache_gb: "):
        _remote(folder, tmp_path, cache_gb=0.0)


def test_a_fetched_shard_that_does_not_match_the_manifest_fails_naming_it(five, tmp_path):
    """Checked as it arrives (sha256 and size against the manifest); nothing unchecked is left on the node."""
    folder, manifest, lengths = five
    bucket = tmp_path / "bucket"
    shutil.copytree(folder, bucket)
    shard = bucket / manifest["shards"][2]["file"]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF  # one payload byte: the size and the header still look right
    shard.write_bytes(bytes(data))
    reader = _remote(folder, tmp_path, cache_gb=1.0, bucket=bucket)
    _gather(reader, [5], lengths)  # shard 0 is whole
    with pytest.raises(ConfigError) as err:
        _gather(reader, [25], lengths)
    assert str(err.value) == (
        f"{bucket}/{shard.name}: corrupt signal shard (its sha256 is not the manifest's); delete the cache "
        "folder and rebuild"
    )
    assert _present(tmp_path, manifest) == {0}
    shard.write_bytes(bytes(data[:-10]))
    with pytest.raises(
        ConfigError, match=rf"^{re.escape(str(shard))}: corrupt signal shard \(\d+ bytes, the"
    ):
        _gather(reader, [25], lengths)
    shard.unlink()
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(shard))}: missing signal shard; delete"):
        _gather(reader, [25], lengths)
    assert _present(tmp_path, manifest) == {0}
    _gather(reader, [5], lengths)  # the reader still serves the good shards


@pytest.mark.gpu
def test_gathering_onto_a_gpu_gives_the_cpu_tensors(five, tmp_path):
    """On CUDA the host tensors are pinned and copied without blocking; the values are the CPU's."""
    folder, _, lengths = five
    reader = sig.SignalReader(folder)
    indices = [0, 19, 20, 33, 47, 5]
    on_gpu = reader.gather(indices, [lengths[i] for i in indices], LAYERS, 1.0, "cuda")
    torch.cuda.synchronize()
    on_cpu = _gather(reader, indices, lengths)
    for layer in LAYERS:
        assert on_gpu["hidden"][layer].is_cuda and torch.equal(
            on_gpu["hidden"][layer].cpu(), on_cpu["hidden"][layer]
        )
    assert torch.equal(on_gpu["rows"].cpu(), on_cpu["rows"])


def test_a_manifest_whose_shards_leave_a_gap_is_refused_at_init_naming_the_folder(five, tmp_path):
    folder, manifest, _ = five
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    gap = dict(manifest, shards=[r for i, r in enumerate(manifest["shards"]) if i != 2])
    (broken / "manifest.json").write_text(json.dumps(gap))
    with pytest.raises(
        ConfigError, match=rf"^{re.escape(str(broken))}: its shards do not hold examples 0\.\.47 "
    ):
        sig.SignalReader(str(broken))
    sig.SignalReader(folder).check_covers(48)
    with pytest.raises(
        ConfigError, match="^data.source: the teacher signals in .* hold 48 examples; this run trains on 40"
    ):
        sig.SignalReader(folder).check_covers(40)

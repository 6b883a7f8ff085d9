"""Teacher signals: the frozen teacher's outputs over the training rows, computed once and read by index.

The teacher is frozen and in eval mode, so for a fixed tokenisation its outputs are a pure function of the
row. A signal cache holds, per training example, the mapped teacher layers' hidden states at every token
(every unit, or only a build's selected units) and the teacher's logits at the loss positions: every class
for classification; for causal LMs the whole vocabulary, or with ``kd.top_k`` the top k logits and the tail's
log-sum-exp at each temperature the cache serves (``flexkd.losses.TopK``). The loop then trains without the
teacher: ``SignalReader.gather`` gives a micro-batch the tensors the live teacher would have given it.

Layout: one content-addressed folder per cache under ``signals.path``::

    <root>/<key>/shard-00000.safetensors ...   written in parallel (tuning/signals.py runs the Ray Data job)
    <root>/<key>/manifest.json                 written last, atomically: a folder without it is never read

The key hashes the *material*: the teacher's files, the student's tokenizer (it decides the positions), the
training rows, the tokenisation settings, precision, layers, dtype, top-k and temperatures. A run looks for
its key, then for a cache whose material differs only by holding more (a superset of layers or
temperatures) or by a finer precision (an fp32 cache serves a bf16 run); anything else is refused with the
config key that differs.

A shard holds its examples' tensors concatenated, with offsets: ``index`` (n,), ``tok_offsets`` (n+1,),
``pos_offsets`` (n+1,), ``hidden.<layer>`` (tokens, d), and ``logits`` (positions, C|V) or ``top_values`` /
``top_indices`` (positions, k) with ``tail`` (positions, temperatures).
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from flexkd.config import Config, ConfigError
from flexkd.data import IGNORE
from flexkd.losses import TopK, head_on_rows, loss_rows, top_k_logits
from flexkd.shardcache import ShardCache
from flexkd.storage import Store

log = logging.getLogger("flexkd")

FORMAT = 1
MANIFEST = "manifest.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Material field -> the config key a user would change to make it differ (named in every refusal).
MATERIAL_KEYS = {
    "teacher": "teacher.path",
    "tokenizer": "student.path",
    "rows": "data.source",
    "task": "data.task",
    "template": "data.template",
    "max_length": "data.max_length",
    "max_response_length": "data.max_response_length",
    "precision": "run.precision",
    "layers": "feature.layers",
    "dtype": "signals.dtype",
    "top_k": "kd.top_k",
    "temperatures": "kd.temperature",
    "units": "signals.units",
}
SUPERSET_FIELDS = ("layers", "temperatures")  # a cache holding more of these serves a run needing fewer
# A cache built in fp32 holds the outputs a bf16 teacher approximates, so it serves a bf16 run too (whose
# student still trains under autocast); a bf16 cache does not serve an fp32 run.
SERVES_PRECISION = {"fp32": {"fp32", "bf16"}, "bf16": {"bf16"}}


class SignalError(ConfigError):
    """A signal cache that cannot serve this run: the message names the config key or the file."""


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def rows_digest(rows) -> str:
    """The training rows' identity in a cache's material (a table is digested a batch at a time, once)."""
    from flexkd.data import rows_digest as full_digest

    return full_digest(rows)[:16]


def tokenizer_digest(tokenizer) -> str:
    return _digest([sorted(tokenizer.get_vocab().items()), tokenizer.all_special_tokens])


def is_causal(cfg: Config) -> bool:
    return cfg.data.task != "classification"


def effective_top_k(cfg: Config, vocab: int) -> int:
    """kd.top_k as the losses apply it: 0 (the full vocabulary, exact) for classification and for k >= vocab."""
    k = cfg.kd.top_k if is_causal(cfg) else 0
    return k if 0 < k < vocab else 0


def temperatures_needed(cfg: Config) -> list[float]:
    """Temperatures whose tail a top-k cache must hold (none when the logits are stored whole)."""
    return [float(cfg.kd.temperature)] if is_causal(cfg) and cfg.kd.top_k else []


def material(cfg: Config, bench, layers: list[int], temperatures: list[float] | None = None) -> dict:
    """What signals for this config depend on. ``bench``: a ``flexkd.workbench.Workbench`` (tokenizers, data)."""
    from flexkd.scorecache import fingerprint_model

    top_k = effective_top_k(cfg, len(bench.tok_s))
    # The rows' digest comes with the tokenised table (written by the first process that reads these rows):
    # mapping it here saves this process a pass over every row.
    bench.encode_table(bench.data.train)
    return {
        "teacher": _digest(fingerprint_model(cfg.teacher.path)),
        "tokenizer": tokenizer_digest(bench.tok_s),
        "rows": rows_digest(bench.data.train),
        "task": cfg.data.task,
        "template": cfg.data.template,
        "max_length": cfg.data.max_length,
        "max_response_length": cfg.data.max_response_length if is_causal(cfg) else 0,
        "precision": cfg.run.precision,
        "layers": sorted(set(layers)),
        "dtype": cfg.signals.dtype,
        "top_k": top_k,
        "temperatures": sorted(set(temperatures if temperatures is not None else temperatures_needed(cfg)))
        if top_k
        else [],
        "units": cfg.signals.units,
    }


def signal_key(mat: dict) -> str:
    return hashlib.sha256(json.dumps({"format": FORMAT, **mat}, sort_keys=True).encode()).hexdigest()[:24]


def differences(have: dict, want: dict) -> list[str]:
    """The material fields in which a cache (``have``) cannot serve ``want``; empty when it can."""
    out = []
    for name in MATERIAL_KEYS:
        a, b = have.get(name), want.get(name)
        if name in SUPERSET_FIELDS:
            if not set(b or []) <= set(a or []):
                out.append(name)
        elif name == "precision":
            if b not in SERVES_PRECISION.get(a, {a}):
                out.append(name)
        elif a != b:
            out.append(name)
    return out


def describe_difference(name: str, have: dict, want: dict, where: str) -> str:
    key = MATERIAL_KEYS[name]
    what = {
        "teacher": "another teacher (its files differ)",
        "tokenizer": "another tokenizer (the student's tokenizer decides the positions)",
        "rows": "other training rows (data.source, its splits or data.max_train_examples differ)",
    }.get(name)
    if what is None:
        what = f"{name} {have.get(name)!r}; this run needs {want.get(name)!r}"
    return f"{key}: the teacher signals in {where} were built for {what}"


def read_manifest(store: Store, name: str) -> dict | None:
    if not store.exists(name, MANIFEST):
        return None
    try:
        return json.loads(store.read(name, MANIFEST))
    except (OSError, ValueError) as err:
        raise SignalError(f"{store.path(name, MANIFEST)}: unreadable manifest ({err})") from None


def manifests(store: Store) -> list[tuple[str, dict]]:
    """(folder name, manifest) of every complete cache under the root."""
    out = []
    for name in store.folders():
        found = read_manifest(store, name)
        if found is not None:
            out.append((name, found))
    return out


def find(cfg: Config, want: dict) -> str | None:
    """The folder (full path) of a cache that serves material ``want``, or None.

    ``signals.path`` may also name one cache folder itself (it holds a manifest): that cache must serve the
    run, or the refusal names the key that differs. With ``signals.mode=cached`` a miss is an error that
    names the nearest cache's first difference.
    """
    root = cfg.signals.path
    direct = Store(root)
    if direct.exists(MANIFEST):  # signals.path is one cache folder
        manifest = json.loads(direct.read(MANIFEST))
        diff = differences(manifest["material"], want)
        if diff:
            raise SignalError(describe_difference(diff[0], manifest["material"], want, root))
        return root
    store = Store(root)
    key = signal_key(want)
    candidates = manifests(store)
    for name, manifest in candidates:
        if name == key or not differences(manifest["material"], want):
            return store.path(name)
    if cfg.signals.mode == "cached":
        if not candidates:
            raise SignalError(
                f"signals.mode: cached, but {root} holds no teacher signals; build them with "
                "`flexkd signals CONFIG` (same keys as this run)"
            )
        name, nearest = min(candidates, key=lambda c: len(differences(c[1]["material"], want)))
        first = differences(nearest["material"], want)[0]
        raise SignalError(describe_difference(first, nearest["material"], want, store.path(name)))
    return None


# ---------------------------------------------------------------------------------------------------------
# Computing one shard (the Ray Data actor and the in-process build both call this)


@dataclass
class ShardSpec:
    """What a shard stores, the same for every shard of one cache."""

    layers: list[int]
    dtype: str
    causal: bool
    top_k: int
    temperatures: list[float]
    vocab: int
    units: dict[int, list[int]] | None  # per layer, the stored units (signals.units=selected); None: all
    precision: str = "fp32"

    def to_dict(self) -> dict:
        data = dict(self.__dict__)
        if self.units is not None:
            data["units"] = {str(k): v for k, v in self.units.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict) -> ShardSpec:
        data = dict(data)
        if data.get("units") is not None:
            data["units"] = {int(k): v for k, v in data["units"].items()}
        return cls(**data)


@torch.no_grad()
def compute_shard(teacher, examples: list[dict], spec: ShardSpec, batch_fn, batch_size: int) -> dict:
    """Run the teacher over ``examples`` (encoded, each with its ``index``) -> the shard's tensors.

    batch_fn: encoded examples -> a batch on the teacher's device (``Workbench.batch``), so the teacher sees
    exactly what the loop would show it.
    """
    dtype = DTYPES[spec.dtype]
    hidden: dict[int, list[torch.Tensor]] = {layer: [] for layer in spec.layers}
    logits, top_values, top_indices, tails = [], [], [], []
    tok_offsets, pos_offsets = [0], [0]
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batch = batch_fn(chunk)
        loss_mask = batch["labels"] != IGNORE
        with head_on_rows(teacher, loss_mask if spec.causal else None):
            out = teacher_forward(teacher, batch, spec.precision)
        # A causal LM's logits as the (N, V) rows of its loss positions, example after example.
        ends = loss_mask.sum(-1).cumsum(0).tolist() if spec.causal else []
        all_rows = loss_rows(out.logits, loss_mask) if spec.causal else out.logits
        for b, ex in enumerate(chunk):
            length = len(ex["input_ids"])
            for layer in spec.layers:
                h = out.hidden_states[layer][b, :length]
                if spec.units is not None:
                    h = h.index_select(-1, torch.tensor(spec.units[layer], device=h.device))
                hidden[layer].append(h.float().to(dtype).cpu())
            rows = all_rows[(ends[b - 1] if b else 0) : ends[b]] if spec.causal else all_rows[b : b + 1]
            tok_offsets.append(tok_offsets[-1] + length)
            pos_offsets.append(pos_offsets[-1] + rows.shape[0])
            if spec.causal and spec.top_k:
                rows = rows[..., : spec.vocab].float()
                top = top_k_logits(rows, spec.top_k, 1.0)
                top_values.append(top.values.to(dtype).cpu())
                top_indices.append(top.indices.to(torch.int32).cpu())
                tails.append(
                    torch.stack([top_k_logits(rows, spec.top_k, t).tail for t in spec.temperatures], -1)
                    .float()
                    .cpu()
                )
            else:
                logits.append(rows.float().to(dtype).cpu())
    tensors = {
        "index": torch.tensor([ex["index"] for ex in examples], dtype=torch.int64),
        "tok_offsets": torch.tensor(tok_offsets, dtype=torch.int64),
        "pos_offsets": torch.tensor(pos_offsets, dtype=torch.int64),
    }
    for layer in spec.layers:
        tensors[f"hidden.{layer}"] = torch.cat(hidden[layer])
    if logits:
        tensors["logits"] = torch.cat(logits)
    if top_values:
        tensors["top_values"] = torch.cat(top_values)
        tensors["top_indices"] = torch.cat(top_indices)
        tensors["tail"] = torch.cat(tails)
    return tensors


def teacher_forward(teacher, batch: dict, precision: str = "fp32"):
    """The teacher's forward on a batch: the one call the live loop and the build share."""
    autocast = (
        torch.autocast(batch["input_ids"].device.type, dtype=torch.bfloat16)
        if precision == "bf16"
        else contextlib.nullcontext()
    )
    with autocast:
        return teacher(
            input_ids=batch.get("teacher_input_ids", batch["input_ids"]),
            attention_mask=batch.get("teacher_attention_mask", batch["attention_mask"]),
            output_hidden_states=True,
        )


def encode_shard(tensors: dict) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in tensors.items()})


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def shard_record(i: int, data: bytes, tensors: dict) -> dict:
    return {
        "file": shard_name(i),
        "first": int(tensors["index"][0]),
        "count": int(tensors["index"].numel()),
        "tokens": int(tensors["tok_offsets"][-1]),
        "positions": int(tensors["pos_offsets"][-1]),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def decode_shard(data: bytes, where: str) -> dict:
    from safetensors.torch import load

    try:
        return load(data)
    except Exception as err:  # safetensors raises its own error types for a truncated or garbled file
        raise corrupt_shard(where, str(err)) from None


def corrupt_shard(where: str, why: str) -> SignalError:
    return SignalError(f"{where}: corrupt signal shard ({why}); delete the cache folder and rebuild")


def missing_shard(where: str) -> SignalError:
    return SignalError(f"{where}: missing signal shard; delete the cache folder and rebuild")


# ---------------------------------------------------------------------------------------------------------
# Estimating, planning and finishing a build


def estimate_bytes(
    tokens: int, positions: int, examples: int, spec: ShardSpec, teacher_hidden: int, classes: int
) -> int:
    """Bytes the shards will take (tensor payloads; headers are a few KB per shard), from the encoded table's
    totals: its tokens, its loss positions (one per example for classification) and its examples."""
    item = DTYPES[spec.dtype].itemsize
    width = {layer: len(spec.units[layer]) if spec.units else teacher_hidden for layer in spec.layers}
    hidden = tokens * sum(width.values()) * item
    if spec.causal and spec.top_k:
        per_position = spec.top_k * (item + 4) + 4 * len(spec.temperatures)
    else:
        per_position = (spec.vocab if spec.causal else classes) * item
    return hidden + positions * per_position + 24 * examples


def check_budget(estimate: int, cfg: Config) -> None:
    limit = cfg.signals.max_gb * 1e9
    if estimate > limit:
        raise SignalError(
            f"signals.max_gb: these signals would take {estimate / 1e9:.2f} GB, over the limit of "
            f"{cfg.signals.max_gb:g} GB; raise it, store bfloat16 (signals.dtype), map fewer layers "
            "(feature.layers), keep the top logits only (kd.top_k) or store the selected units (signals.units=selected)"
        )


def write_manifest(
    store: Store, key: str, mat: dict, spec: ShardSpec, shards: list[dict], extra: dict
) -> dict:
    shards = sorted(shards, key=lambda r: r["first"])
    total = sum(r["bytes"] for r in shards)
    tokens = sum(r["tokens"] for r in shards)
    manifest = {
        "format": FORMAT,
        "key": key,
        "material": mat,
        "spec": spec.to_dict(),
        "examples": sum(r["count"] for r in shards),
        "shards": shards,
        "sizes": {
            "bytes": total,
            "tokens": tokens,
            "positions": sum(r["positions"] for r in shards),
            "bytes_per_token": total / max(tokens, 1),
        },
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        **extra,
    }
    store.write(json.dumps(manifest, indent=1).encode(), key, MANIFEST)  # last: the cache now exists
    return manifest


# ---------------------------------------------------------------------------------------------------------
# Reading


MAX_OPEN = 16  # local shard files kept open between micro-batches (opening one again is a header read)
# safetensors dtype names -> torch dtypes: the ones a shard holds.
ST_DTYPES = {
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "I64": torch.int64,
    "I32": torch.int32,
}


def read_header(fd: int, size: int) -> dict[str, tuple[torch.dtype, list[int], int]]:
    """A safetensors file's tensors: name -> (dtype, shape, absolute byte offset of its data).

    The format is an 8-byte little-endian header length, that many bytes of JSON (per tensor its dtype, shape
    and ``data_offsets`` from the end of the header), then the data. Raises ValueError on anything else."""
    head = os.pread(fd, 8, 0)
    if len(head) < 8:
        raise ValueError("shorter than a safetensors header")
    n = int.from_bytes(head, "little")
    if n > size - 8:
        raise ValueError(f"header length {n} past the end of the file")
    meta = json.loads(os.pread(fd, n, 8))
    out = {}
    for name, info in meta.items():
        if name == "__metadata__":
            continue
        dtype = ST_DTYPES[info["dtype"]]
        begin, stop = info["data_offsets"]
        count = 1
        for dim in info["shape"]:
            count *= dim
        if stop - begin != count * dtype.itemsize or 8 + n + stop > size:
            raise ValueError(f"tensor {name}: its data offsets do not fit its shape or the file")
        out[name] = (dtype, list(info["shape"]), 8 + n + begin)
    return out


@dataclass
class _Open:
    """One shard being read: its open file, its tensors' layout, its examples' offsets and, for a fetched
    shard, the descriptor that keeps the ``ShardCache`` from evicting it.

    Rows are read with positioned reads at the byte offsets the safetensors header gives, straight into the
    batch tensor: a process holds the bytes of the examples it reads, and nothing else of the file. (A
    ``safe_open`` mapping made about 2 MB of the shard resident at each open, and more at each slice, so a
    reader's resident memory grew with the shards it had touched.) The page cache, which every process of the
    node shares, serves the reads."""

    fd: int
    tensors: dict  # name -> (dtype, shape, data offset)
    tok: list[int]  # (n+1,) offsets of its examples' tokens and loss positions
    pos: list[int]
    hold: int | None

    @property
    def names(self) -> set[str]:
        return set(self.tensors)

    def width(self, name: str) -> list[int]:
        """The shape of one row of tensor ``name`` (its shape after the first dimension)."""
        return self.tensors[name][1][1:]

    def read(self, name: str, r0: int, r1: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``r0:r1`` of tensor ``name``, (r1 - r0, *width) in its stored dtype; into ``out`` (contiguous,
        that shape, the stored dtype) when given, else into a new tensor."""
        dtype, shape, offset = self.tensors[name]
        row = dtype.itemsize
        for dim in shape[1:]:
            row *= dim
        if out is None:
            out = torch.empty((r1 - r0, *shape[1:]), dtype=dtype)
        if r1 > r0:
            view = out.view(-1).view(torch.uint8).numpy()
            got = os.preadv(self.fd, [view], offset + r0 * row)
            if got != view.nbytes:
                raise OSError(f"read {got} of {view.nbytes} bytes")
        return out

    def close(self) -> None:
        os.close(self.fd)
        if self.hold is not None:
            os.close(self.hold)


def _concat(pieces: list[torch.Tensor], dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """``torch.cat(pieces)`` as ``dtype`` (pieces (n_i, ...) -> (sum n_i, ...)) into one new tensor, in pinned
    memory when ``pin``."""
    out = torch.empty((sum(p.shape[0] for p in pieces), *pieces[0].shape[1:]), dtype=dtype, pin_memory=pin)
    at = 0
    for p in pieces:
        out[at : at + p.shape[0]] = p
        at += p.shape[0]
    return out


class SignalReader:
    """A cache folder, read by training-example index; nothing is read before a micro-batch needs it.

    Shards are memory-mapped and sliced per example, never read whole: a process holds the handles of the
    shards it reads (at most ``MAX_OPEN`` of a local cache; of a cloud cache, one micro-batch's) and their
    examples' offsets. Start-up reads the manifest alone. A local shard is checked when first opened (its size
    against the manifest, its header), not checksummed again: the writer hashed what it wrote. A cloud cache's
    shards (s3://, gs://) are fetched into a ``flexkd.shardcache.ShardCache`` on local disk, checksummed as
    they arrive.

    cache_gb, cache_dir: ``signals.local_cache_gb`` and ``signals.local_cache_dir`` (cloud caches only).
    fetch: name -> the shard file's bytes in pieces; given, the shards come through the ShardCache even from a
    local folder (the tests' stand-in for a bucket); by default a cloud folder streams them through
    ``Store.chunks``. ``opened``: the names of the shard files this reader has opened.
    """

    def __init__(
        self,
        folder: str,
        cache_gb: float = 20.0,
        cache_dir: str = "",
        fetch: Callable[[str], Iterable[bytes]] | None = None,
    ):
        self.folder = folder.rstrip("/")
        self.store = Store(self.folder)
        if not self.store.exists(MANIFEST):
            raise SignalError(
                f"{self.folder}: no {MANIFEST}; the build did not finish (rerun `flexkd signals` to resume it)"
            )
        manifest = json.loads(self.store.read(MANIFEST))
        self.manifest = manifest
        self.spec = ShardSpec.from_dict(manifest["spec"])
        self.shards = sorted(manifest["shards"], key=lambda r: r["first"])
        self._firsts = [r["first"] for r in self.shards]  # example -> shard is a bisect over these
        end = 0
        for record in self.shards:
            if record["first"] != end:
                raise SignalError(
                    f"{self.folder}: its shards do not hold examples 0..{self.examples - 1} one after another "
                    f"({record['file']} starts at example {record['first']}, not {end}); delete the cache folder "
                    "and rebuild"
                )
            end += record["count"]
        if end != self.examples:
            raise SignalError(
                f"{self.folder}: its shards hold {end} examples, its {MANIFEST} says {self.examples}; delete "
                "the cache folder and rebuild"
            )
        self.opened: set[str] = set()
        self._open: OrderedDict[int, _Open] = OrderedDict()  # least recently used first
        # gather runs on the loop's prefetch thread: opening, evicting and slicing happen under this lock.
        self._lock = threading.Lock()
        self.cache: ShardCache | None = None
        if fetch is not None or not self.store.local:
            self.cache = self._shard_cache(cache_gb, cache_dir, fetch or self.store.chunks)

    def _shard_cache(self, cache_gb: float, cache_dir: str, fetch) -> ShardCache:
        if not cache_gb > 0:  # also NaN
            raise SignalError(f"signals.local_cache_gb: {cache_gb} is not a positive number of GB")
        largest = max((r["bytes"] for r in self.shards), default=0)
        if largest > cache_gb * 1e9:
            raise SignalError(
                f"signals.local_cache_gb: {cache_gb:g} GB holds fewer shards than one batch needs (the largest "
                f"shard of {self.folder} alone is {largest / 1e9:.3g} GB); raise it"
            )
        key = self.manifest.get("key") or self.folder.rsplit("/", 1)[-1]
        root = cache_dir or os.path.join(tempfile.gettempdir(), "flexkd-signals")
        return ShardCache(os.path.join(root, key), cache_gb * 1e9, fetch, self.folder)

    @property
    def examples(self) -> int:
        return self.manifest["examples"]

    def check_covers(self, n_examples: int) -> None:
        # The shards were checked to hold 0..examples-1 one after another at init.
        if self.examples != n_examples:
            raise SignalError(
                f"data.source: the teacher signals in {self.folder} hold {self.examples} examples; "
                f"this run trains on {n_examples}"
            )

    def close(self) -> None:
        """Unmap every shard and let the ShardCache evict them (the reader opens them again when asked)."""
        with self._lock:
            while self._open:
                self._open.popitem(last=False)[1].close()

    def _place(self, index: int) -> tuple[int, int]:
        """Training example -> (its shard's position in ``self.shards``, its row in that shard)."""
        index = int(index)
        s_i = bisect.bisect_right(self._firsts, index) - 1
        if not 0 <= index < self.examples:
            raise SignalError(f"{self.folder}: no signals for training example {index}")
        return s_i, index - self._firsts[s_i]

    def _acquire(self, needed: list[int]) -> dict[int, _Open]:
        """The open shards ``needed`` (positions in ``self.shards``), opened or fetched as needed."""
        names = {self.shards[s_i]["file"] for s_i in needed}
        others = [s_i for s_i in self._open if s_i not in needed]  # least recently used first
        if self.cache is not None:
            need = sum(self.shards[s_i]["bytes"] for s_i in needed)
            if need > self.cache.limit:
                raise SignalError(
                    f"signals.local_cache_gb: {self.cache.limit / 1e9:g} GB holds fewer shards than one batch "
                    f"needs ({need / 1e9:.3g} GB); raise it"
                )
            for s_i in others:  # let go first: the room this batch needs may be theirs
                self._open.pop(s_i).close()
        for s_i in needed:
            if s_i in self._open:
                self._open.move_to_end(s_i)
                if self.cache is not None:
                    self.cache.touch(self.shards[s_i]["file"])
            else:
                self._open[s_i] = self._open_shard(s_i, names)
        if self.cache is None:
            for s_i in others[: max(len(self._open) - MAX_OPEN, 0)]:
                self._open.pop(s_i).close()
        return {s_i: self._open[s_i] for s_i in needed}

    def _open_shard(self, s_i: int, batch: set[str]) -> _Open:
        record = self.shards[s_i]
        name = record["file"]
        where, hold = f"{self.folder}/{name}", None
        if self.cache is None:
            path = self.store.path(name)
            try:
                size = os.stat(path).st_size
            except FileNotFoundError:
                raise missing_shard(where) from None
            if size != record["bytes"]:
                raise corrupt_shard(where, f"{size} bytes, the manifest says {record['bytes']}")
        else:
            hold = self.cache.acquire(record, batch - {name})
            path = str(self.cache.path(name))
        try:
            # The small tensors are read at every open (a few KB): only the open shards' offsets are held.
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                raise missing_shard(where) from None
            try:
                shard = _Open(fd, read_header(fd, os.fstat(fd).st_size), [], [], hold)
                index = shard.read("index", 0, shard.tensors["index"][1][0])
                shard.tok = shard.read("tok_offsets", 0, shard.tensors["tok_offsets"][1][0]).tolist()
                shard.pos = shard.read("pos_offsets", 0, shard.tensors["pos_offsets"][1][0]).tolist()
            except (ValueError, KeyError, OSError) as err:  # a truncated or garbled file
                os.close(fd)
                raise corrupt_shard(where, " ".join(str(err).split())) from None
            tok, pos = shard.tok, shard.pos
            first, count = record["first"], record["count"]
            if not torch.equal(index, torch.arange(first, first + count, dtype=index.dtype)):
                os.close(fd)
                raise corrupt_shard(where, f"it does not hold examples {first}..{first + count - 1}")
            if len(tok) != count + 1 or len(pos) != count + 1 or tok[-1] != record["tokens"]:
                os.close(fd)
                raise corrupt_shard(where, "its offsets do not match the manifest")
        except BaseException:
            if hold is not None:
                os.close(hold)
            raise
        self.opened.add(name)
        return shard

    def gather(
        self,
        indices: list[int],
        lengths: list[int],
        layers: list[int],
        temperature: float,
        device,
    ) -> dict:
        """The micro-batch's teacher outputs, as the live teacher gives them to the losses.

        Returns ``{"hidden": {layer: (B, T, d) float32, zero past each example's length}, "rows": the logits at
        the loss positions, (N, C|V) float32 or a TopK}``, T = max(lengths). ``lengths`` are the examples'
        token counts in this run; a count that differs from the cache's is an error (another tokenisation).
        """
        device = torch.device(device)
        # Pinned host memory on a GPU run: the copies overlap the step the main thread is running.
        pin = device.type == "cuda"
        width = max(lengths)
        with self._lock:
            places = [self._place(i) for i in indices]
            shards = self._acquire(list(dict.fromkeys(s_i for s_i, _ in places)))
            parts = []
            for i, length, (s_i, j) in zip(indices, lengths, places):
                tok, pos = shards[s_i].tok, shards[s_i].pos
                t0, t1, p0, p1 = tok[j], tok[j + 1], pos[j], pos[j + 1]
                if t1 - t0 != length:
                    raise SignalError(
                        f"data.max_length: training example {i} has {length} tokens here and {t1 - t0} in the "
                        f"teacher signals of {self.folder}; they were built with another tokenisation"
                    )
                parts.append((shards[s_i], t0, t1, p0, p1))
            first = parts[0][0]
            hidden = {}
            for layer in layers:
                name = f"hidden.{layer}"
                if name not in first.names:
                    raise SignalError(
                        f"feature.layers: teacher layer {layer} is not in the signals of {self.folder} "
                        f"(they hold {self.spec.layers})"
                    )
                d = first.width(name)[-1]
                stored = first.tensors[name][0]
                out = torch.zeros(len(indices), width, d, dtype=torch.float32, pin_memory=pin)
                for b, (shard, t0, t1, _, _) in enumerate(parts):
                    if stored == torch.float32:  # read straight into the batch: no copy
                        shard.read(name, t0, t1, out[b, : t1 - t0])
                    else:
                        out[b, : t1 - t0] = shard.read(name, t0, t1)
                hidden[layer] = out.to(device, non_blocking=pin)

            def rows_of(name: str, dtype: torch.dtype, column: int | None = None) -> torch.Tensor:
                pieces = [shard.read(name, p0, p1) for shard, _, _, p0, p1 in parts]
                if column is not None:
                    pieces = [p[:, column] for p in pieces]
                return _concat(pieces, dtype, pin).to(device, non_blocking=pin)

            if "logits" in first.names:
                rows = rows_of("logits", torch.float32)
            else:
                temps = self.spec.temperatures
                if float(temperature) not in temps:
                    raise SignalError(
                        f"kd.temperature: {temperature:g} is not among the temperatures of the top-k signals in "
                        f"{self.folder} ({temps}); build signals for it"
                    )
                t = temps.index(float(temperature))
                rows = TopK(
                    rows_of("top_values", torch.float32),
                    rows_of("top_indices", torch.long),
                    rows_of("tail", torch.float32, column=t),
                )
        return {"hidden": hidden, "rows": rows}

    def unit_columns(self, layer: int, units: list[int]) -> list[int]:
        """Columns of the stored hidden states holding ``units`` (all units stored: the units themselves)."""
        if self.spec.units is None:
            return list(units)
        stored = {u: c for c, u in enumerate(self.spec.units[layer])}
        missing = [u for u in units if u not in stored]
        if missing:
            raise SignalError(
                f"signals.units: this run selects teacher units {missing[:5]}{'...' if len(missing) > 5 else ''} "
                f"of layer {layer}, which the signals in {self.folder} do not hold (they keep the build's "
                "selection); use signals.units=all or the build's selection.k and strategy"
            )
        return [stored[u] for u in units]


# ---------------------------------------------------------------------------------------------------------
# A build: planned on the driver, shards computed by ``ShardWriter`` (in a Ray Data actor, or in process),
# the manifest written last.


class Chunks:
    """The encoded training examples cut into shards of ``size``, read from the table when asked for:
    ``chunks[i]`` is shard i's examples, each with its ``index``; ``chunks.range(i)`` its indices."""

    def __init__(self, rows, size: int):
        self.rows, self.size = rows, size

    def __len__(self) -> int:
        return -(-len(self.rows) // self.size)

    def range(self, i: int) -> range:
        return range(i * self.size, min((i + 1) * self.size, len(self.rows)))

    def __getitem__(self, i: int) -> list[dict]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        span = self.range(i)
        return [{**ex, "index": j} for j, ex in zip(span, self.rows.take(span))]


@dataclass
class BuildPlan:
    key: str
    material: dict
    spec: ShardSpec
    chunks: Chunks
    """The encoded training examples (each with its ``index``), cut into shards."""
    estimate: int
    tokens: int
    root: str

    @property
    def folder(self) -> str:
        return Store(self.root).path(self.key)

    def describe(self) -> str:
        stored = "selected units" if self.spec.units else "every unit"
        if self.spec.causal:
            logits = f"top {self.spec.top_k} logits + tail" if self.spec.top_k else "full-vocabulary logits"
        else:
            logits = "class logits"
        return (
            f"teacher signals {self.key}: {len(self.chunks.rows)} examples, {self.tokens} tokens, "
            f"layers {self.spec.layers} ({stored}), {logits}, {self.spec.dtype}; estimate "
            f"{self.estimate / 1e6:.1f} MB ({self.estimate / max(self.tokens, 1):.0f} B/token) in "
            f"{len(self.chunks)} shard(s)"
        )


def plan_build(
    cfg: Config,
    bench,
    layers: list[int],
    temperatures: list[float] | None = None,
    units: dict[int, list[int]] | None = None,
) -> BuildPlan:
    """What a build of ``layers`` for this config writes, and where (nothing is computed yet)."""
    from flexkd.models import hidden_size

    # The rows are tokenised into the shared Arrow table (or mapped from it): the driver holds no examples,
    # and each teacher actor reads its shard's rows from the same files.
    examples = bench.encode_table(bench.data.train)
    mat = material(cfg, bench, layers, temperatures)
    spec = ShardSpec(
        layers=mat["layers"],
        dtype=cfg.signals.dtype,
        causal=is_causal(cfg),
        top_k=mat["top_k"],
        temperatures=mat["temperatures"],
        vocab=len(bench.tok_s),
        units=units,
        precision=cfg.run.precision,
    )
    chunks = Chunks(examples, cfg.signals.shard_examples)
    estimate = estimate_bytes(
        examples.tokens,
        examples.positions,
        len(examples),
        spec,
        hidden_size(bench.teacher_config),
        max(len(bench.data.label_names), 1),
    )
    return BuildPlan(signal_key(mat), mat, spec, chunks, estimate, examples.tokens, cfg.signals.path)


class ShardWriter:
    """Holds one copy of the teacher; ``writer(i, examples)`` computes and writes shard i, returns its record.

    A shard file already there from an interrupted build is checked and kept (the build resumes).
    """

    def __init__(self, cfg_dict: dict, label_names: list[str], spec: dict, folder: str):
        from flexkd.config import from_dict
        from flexkd.models import load_teacher
        from flexkd.workbench import make_batcher, open_tokenizers, pick_device

        cfg = from_dict(cfg_dict)
        self.cfg = cfg
        self.spec = ShardSpec.from_dict(spec)
        self.store = Store(folder)
        device = pick_device(cfg)
        tok_t, tok_s = open_tokenizers(cfg)
        self.teacher = load_teacher(cfg, tok_t, label_names).to(device)
        self.batch = make_batcher(tok_t, tok_s, device)
        self.computed = 0
        self.kept = 0

    def __call__(self, i: int, examples: list[dict]) -> dict:
        name = shard_name(i)
        if self.store.exists(name):
            data = self.store.read(name)
            try:
                tensors = decode_shard(data, name)
                if tensors["index"].tolist() == [e["index"] for e in examples]:
                    self.kept += 1
                    return shard_record(i, data, tensors)
            except SignalError:
                pass  # a shard cut short by the interruption: computed again below
        tensors = compute_shard(self.teacher, examples, self.spec, self.batch, self.cfg.signals.batch_size)
        data = encode_shard(tensors)
        self.store.write(data, name)
        self.computed += 1
        return shard_record(i, data, tensors)


def finish_build(bp: BuildPlan, records: list[dict], seconds: float, **extra) -> dict:
    missing = sorted(set(range(len(bp.chunks))) - {int(r["file"][6:11]) for r in records})
    if missing:
        raise RuntimeError(f"{bp.folder}: shards {missing} were not written; rerun the build to resume it")
    return write_manifest(
        Store(bp.root), bp.key, bp.material, bp.spec, records, {"build_s": seconds, **extra}
    )


def build_in_process(cfg: Config, bp: BuildPlan, label_names: list[str]) -> dict:
    """The build without Ray (one teacher copy in this process): the same ``ShardWriter`` as the Ray Data job."""
    from flexkd.config import to_dict

    store = Store(bp.root)
    with store.lock(bp.key):
        found = read_manifest(store, bp.key)
        if found is not None:
            return found
        start = time.perf_counter()
        writer = ShardWriter(to_dict(cfg), label_names, bp.spec.to_dict(), bp.folder)
        records = [writer(i, chunk) for i, chunk in enumerate(bp.chunks)]
        return finish_build(bp, records, time.perf_counter() - start, actors=0)


# ---------------------------------------------------------------------------------------------------------
# A run's plan: cached signals instead of the teacher, when they exist


def attach(cfg: Config, plan, bench=None):
    """Point the plan at a cache that serves this run (``signals.mode`` auto or cached); the loop then loads
    no teacher weights. Returns the plan (changed in place). ``bench``: an open workbench, if the caller has one."""
    if cfg.signals.mode == "live" or not plan.loads_teacher or plan.signals:
        return plan
    if bench is None:
        from flexkd.workbench import open_workbench

        bench = open_workbench(cfg, need_teacher=False)
    folder = find(cfg, material(cfg, bench, plan.teacher_layers))
    if folder:
        plan.signals = folder
        plan.loads_teacher = False
        log.info("teacher signals: %s (the loop loads no teacher)", folder)
    elif cfg.signals.mode == "auto":
        plan.notes.append(
            f"no teacher signals in {cfg.signals.path} for this run; the loop runs the teacher live "
            "(`flexkd signals CONFIG` builds them once for every later run)"
        )
    return plan

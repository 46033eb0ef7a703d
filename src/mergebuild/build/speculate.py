"""A first build reads each new input once: hash it while merging, publish under the real keys.

A node's key needs its inputs' hashes, and a file never seen before (no memo) would have to be
read once to hash it and again to merge it: about twice the I/O floor for the most common build
of all, the first one after a download. Instead the build is speculative:

1. plan with placeholder hashes for the unhashed inputs (unique per file, of the real lengths);
2. run the fused pass into temp files, hashing those inputs from the bytes it reads
   (engine/hash_tap.py); the headers hold placeholder provenance;
3. re-plan with the real hashes (now memoized): pins and the lock file are checked here, and a
   mismatch fails the build with nothing published;
4. under the keys' locks, each temp whose real key the cache already has (the same bytes were
   built before, under another path) is dropped and the report says so; the others get their
   real header, written over the placeholder one (same length: hashes are fixed-length hex,
   the JSON is padded to 8 bytes) or, if the length differs, into a new file with the data
   copied in the kernel (copy_file_range); then renamed into the cache as usual.

The data section's checksum was taken while writing and stays valid (hashing.SplitChecksum).
Inputs that cannot be hashed this way are hashed first, as before: .ckpt files and LoRAs (not
read through the tensor reader), inputs of a `fold` node (its term order depends on keys), and
recipes too long for one fused pass. So are files that were only touched (memo.
probably_unchanged): hashing them first finds everything in the cache and merges nothing.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

import xxhash

from mergebuild.errors import BuildError
from mergebuild.hashing import FileHashes, SplitChecksum, stat_signature
from mergebuild.locate import ResolvedInput, virtual_fs

if TYPE_CHECKING:
    import networkx as nx

    from mergebuild.build.builder import Builder
    from mergebuild.build.execute import PassFile
    from mergebuild.build.plan import Item, Plan
    from mergebuild.cache import CacheStore
    from mergebuild.recipe.model import Recipe

SAFETENSORS = (".safetensors", ".sft")
DROPPED = "in cache: the same bytes were built before (another path); this build's copy dropped"


def unhashed_inputs(
    recipe: Recipe, graph: nx.DiGraph, names: list[str], store: CacheStore
) -> dict[str, ResolvedInput]:
    """The models a build may hash while merging, with placeholder hashes."""
    import networkx as nx

    from mergebuild.lora.source import header_is_lora

    folded: set[str] = set()
    for name, node in recipe.nodes.items():
        if node.method == "fold":
            folded |= {n for k, n in nx.ancestors(graph, ("merge", name)) if k == "model"}
    out: dict[str, ResolvedInput] = {}
    for name in names:
        path = recipe.models[name].path
        if name in folded or path is None or path.suffix.lower() not in SAFETENSORS:
            continue
        try:
            st = path.stat()
            if not path.is_file() or virtual_fs(path) or store.hashes.memoized(path, st):
                continue
            if store.hashes.probably_unchanged(path, st):
                continue  # touched: hashing first finds everything cached, merging nothing
            if header_is_lora(path):
                continue
        except (OSError, BuildError):
            continue  # the normal resolution reports what is wrong with it
        real = os.path.realpath(path).encode()
        sha = hashlib.sha256(b"mergebuild-pending\0" + real).hexdigest()
        key = xxhash.xxh3_128_hexdigest(b"mergebuild-pending\0" + real)
        hashes = FileHashes(key, sha, sha[:8], st.st_size)
        out[name] = ResolvedInput(name, path, hashes, stat_signature(st), memoized=False)
    return out


def build_speculatively(builder: Builder, plan: Plan) -> dict[tuple[str, str], Item] | None:
    """Steps 2-4 above for a speculative `plan`; returns the items it built or dropped (by
    (kind, name), with status, seconds and stats), or None when it cannot: more than one
    pass (too many files, or a LoRA made in the recipe and baked in it)."""
    from mergebuild.build.execute import FILES_PER_PASS_FDS, Execution
    from mergebuild.build.locks import locked

    building = plan.to_build()
    group = [i for i in building if i.kind == "output" or i.stored]
    ex = Execution(
        builder.recipe,
        builder.store,
        builder.progress,
        builder.jobs,
        builder.max_memory,
        builder.device,
    )
    if not group or len(ex.groups(group)) > 1:
        return None
    merges = [i for i in building if i.kind == "merge"]
    pending = set(plan.pending)
    with ex.pass_files(plan, group, merges, hash_inputs=pending, temp_shard="00") as done:
        found = dict(done.fused.input_hashes)
        builder.hashed_while_merging = sorted(found)
        for name in plan.pending:
            path, sig = plan.models[name]
            if name not in found:  # not read through a tap (e.g. a LoRA): read it now
                found[name] = builder.store.hashes.hashes(path)[0]
            else:
                builder.store.hashes.remember(path, found[name], sig)
        real = builder.plan()  # the real keys; a wrong pin or lock fails here
        by_name = {(i.kind, i.name): i for i in real.items}
        keys = [by_name[(f.item.kind, f.item.name)].key for f in done.files]
        outcome: dict[tuple[str, str], Item] = {}
        with locked(builder.store, keys, FILES_PER_PASS_FDS):
            keep: list[PassFile] = []
            kept: set[str] = set()
            for f, key in zip(done.files, keys, strict=True):
                item = by_name[(f.item.kind, f.item.name)]
                if key in kept:  # two names for one value (the same bytes under two paths)
                    item.status, item.seconds = "built", done.seconds
                elif builder.store.has(key) and builder.store.problem(key) is None:
                    item.status, item.reason = "cached", DROPPED
                else:
                    if builder.store.has(key):  # corrupted: ours replaces it
                        builder.store.remove(key)
                    _rewrite_header(builder.recipe, real, f)
                    keep.append(f)
                    kept.add(key)
                    item.status, item.seconds = "built", done.seconds
                outcome[(item.kind, item.name)] = item
            ex.publish(keep, [by_name[(f.item.kind, f.item.name)].key for f in keep])
        for item in building:  # `cache: false` nodes and the stats of every merge
            mine = by_name[(item.kind, item.name)]
            if item.kind == "merge":
                mine.stats = ex.node_stats(done.fused.stats[item.name], item.name)
            if (item.kind, item.name) not in outcome and not item.stored:
                if keep:  # computed for a file that was published
                    mine.status, mine.seconds = "built", done.seconds
                else:
                    mine.status, mine.reason = "cached", DROPPED
                outcome[(item.kind, item.name)] = mine
    return outcome


def _rewrite_header(recipe: Recipe, real: Plan, f: PassFile) -> None:
    """Give the temp file its real header (the provenance with the real hashes and keys)."""
    from mergebuild.engine.safetensors_io import layout
    from mergebuild.graph import canonical_json, node_identity
    from mergebuild.provenance import output_metadata

    sink = f.sink
    meta = dict(sink.metadata)  # keeps fields added to the sink (an extracted LoRA's ss_*)
    if f.item.kind == "merge":
        meta["mergebuild.node"] = canonical_json(node_identity(recipe, f.item.name, real.keys))
    else:
        meta.update(output_metadata(recipe, f.item.name, real.keys, real.facts))
    head, _ = layout(sink.infos, meta)
    old = sink.writer.head
    body = sink.writer.body_digest()
    if len(head) == len(old):
        fd = os.open(f.tmp, os.O_WRONLY)
        try:
            if os.pwrite(fd, head, 0) != len(head):
                raise OSError(f"short write to {f.tmp}")
            os.fsync(fd)
        finally:
            os.close(fd)
    else:
        f.tmp = _with_new_header(f.tmp, head, len(old))
    f.checksum = SplitChecksum.of(head, body) if body is not None else None


def _with_new_header(tmp: Path, head: bytes, old_len: int) -> Path:
    """A new temp next to `tmp`: `head`, then `tmp`'s data section (copied in the kernel)."""
    from mergebuild.atomic import make_temp

    fd, new = make_temp(tmp.parent, ".safetensors")
    try:
        with open(tmp, "rb") as src:
            size = os.fstat(src.fileno()).st_size
            if os.pwrite(fd, head, 0) != len(head):
                raise OSError(f"short write to {new}")
            at, dst = old_len, len(head)
            while at < size:
                n = _copy_range(src.fileno(), fd, at, dst, size - at)
                at, dst = at + n, dst + n
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        new.unlink(missing_ok=True)
        raise
    os.close(fd)
    tmp.unlink()
    return new


def _copy_range(src: int, dst: int, at: int, to: int, n: int) -> int:
    try:
        got = os.copy_file_range(src, dst, min(n, 1 << 30), at, to)
    except OSError:
        got = 0
    if got > 0:
        return got
    data = os.pread(src, min(n, 8 << 20), at)  # no copy_file_range here: copy through memory
    if not data:
        raise OSError(f"file ended at byte {at}")
    return os.pwrite(dst, data, to)

"""sept plan: what a run over a pool of N images will cost, stage by stage, before renting a cluster.

Every throughput comes from a profile file: one measured here by ``sept plan --calibrate``, or
one a user writes from their own cluster. Nothing here is a hidden constant: the arithmetic is
in ``estimate`` and each figure names the profile field it came from.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import time
from dataclasses import asdict, dataclass, field, fields

from sept.errors import SeptError
from sept.index.spec import choose_factory
from sept.io import atomic_write_json

GIB = 1024**3

COORDINATOR_BYTES_PER_SELECTED = 56
"""Peak memory of ``sept select``'s driver per selected sample, above its search results, at a
budget of 1M (benchmarks/select_memory.py; RESULTS.md, "the coordinator at <= 64 B a selected
sample"). A property of sept's code, not of a machine, so it lives here and not in a profile."""
NEIGHBOUR_BYTES = 12  # one search result: a float32 similarity and an int64 id


@dataclass
class Profile:
    """Measured throughputs of one kind of machine. `per_device` is one GPU, or one CPU node."""

    name: str
    source: str  # how the figures were obtained
    embed_images_per_s_per_device: float
    index_encode_vectors_per_s_per_node: float
    index_train_s: float  # training the quantizer and PQ once, on its bounded sample
    search_queries_per_s_per_shard: float
    pretrain_images_per_s_per_device: float
    read_mb_per_s_per_node: float
    image_bytes: float  # mean size of one pool image as stored in the shards

    @classmethod
    def load(cls, path: str) -> Profile:
        try:
            with open(path) as f:
                raw = json.load(f)
        except FileNotFoundError:
            raise SeptError(
                f"profile not found: {path} (write one with `sept plan --calibrate --profile {path}`)"
            ) from None
        except json.JSONDecodeError as exc:
            raise SeptError(f"profile {path} is not valid JSON: {exc}") from None
        names = {f.name for f in fields(cls)}
        missing = sorted(names - set(raw))
        if missing:
            raise SeptError(f"profile {path} lacks {', '.join(missing)}")
        return cls(**{k: raw[k] for k in names})

    def save(self, path: str) -> None:
        atomic_write_json(path, asdict(self))


@dataclass
class PlanInputs:
    # sept plan asks for images and devices unless it only calibrates, so they are optional there
    images: int = field(metadata={"required": False, "help": "pool size"})
    devices: int = field(  # GPUs in all (or CPU nodes when the profile is a CPU one)
        metadata={"flag": "--gpus", "required": False, "help": "GPUs in all (CPU nodes for a CPU profile)"}
    )
    dim: int = field(default=256, metadata={"help": "embedding dimension"})
    nodes: int = field(default=1, metadata={"help": "nodes in all"})
    memory_per_node_gib: float = field(
        default=256.0, metadata={"flag": "--memory-per-node", "help": "GiB of RAM per node"}
    )
    budget_fraction: float = field(default=0.1, metadata={"help": "share of the pool selected"})
    queries: int = field(default=10_000, metadata={"help": "target images that query the index"})
    pretrain_epochs: float = field(
        default=100.0, metadata={"flag": "--epochs", "help": "pre-training epochs over the selection"}
    )
    index_memory_fraction: float = 0.5  # of a node's memory that one searcher may use for its shards


def index_bytes(factory: str, n: int, dim: int) -> int:
    """Memory (and disk) of the index: codes plus 8-byte ids, plus IVF centroids."""
    parts = factory.split(",")
    nlist = 0
    code = dim * 4
    for p in parts:
        if p.startswith("IVF"):
            nlist = int(re.match(r"IVF(\d+)", p).group(1))  # IVF262144_HNSW32: the quantizer follows the count
        elif p.startswith("PQ"):
            code = int(p[2:].split("x")[0])
        elif p == "Flat":
            code = dim * 4
    return n * (code + 8) + nlist * dim * 4


def estimate(inp: PlanInputs, prof: Profile) -> dict:
    if min(inp.images, inp.dim, inp.devices, inp.nodes) <= 0:
        raise SeptError("--images, --dim, --gpus and --nodes must be positive")
    n = inp.images
    factory, why = choose_factory(n, inp.dim)
    idx_bytes = index_bytes(factory, n, inp.dim)
    shard_budget = inp.index_memory_fraction * inp.memory_per_node_gib * GIB
    shards = max(1, math.ceil(idx_bytes / shard_budget))
    searchers = min(shards, inp.nodes)
    waves = math.ceil(shards / searchers)
    selected = int(inp.budget_fraction * n)
    # Every query image searched for twice its share of the budget (sept.index.budget.neighbours_needed).
    neighbours = inp.queries * min(n, max(10, 2 * math.ceil(selected / inp.queries)))
    coordinator_bytes = selected * COORDINATOR_BYTES_PER_SELECTED + neighbours * NEIGHBOUR_BYTES

    embed_compute_s = n / (prof.embed_images_per_s_per_device * inp.devices)
    embed_read_s = n * prof.image_bytes / (prof.read_mb_per_s_per_node * 1e6 * inp.nodes)
    embed_s = max(embed_compute_s, embed_read_s)
    index_s = prof.index_train_s + n / (prof.index_encode_vectors_per_s_per_node * inp.nodes)
    search_s = inp.queries * shards / (prof.search_queries_per_s_per_shard * searchers)
    materialize_s = n * prof.image_bytes / (prof.read_mb_per_s_per_node * 1e6 * inp.nodes)
    pretrain_s = inp.pretrain_epochs * selected / (prof.pretrain_images_per_s_per_device * inp.devices)
    return dict(
        inputs=asdict(inp),
        profile=prof.name,
        factory=factory,
        factory_reason=why,
        stages=dict(
            embed=dict(
                seconds=embed_s, images_per_s=n / embed_s, bound="read" if embed_read_s > embed_compute_s else "compute"
            ),
            index=dict(seconds=index_s, memory_gib=idx_bytes / GIB, disk_gib=idx_bytes / GIB, shards=shards),
            select=dict(
                seconds=search_s + materialize_s,
                searchers=searchers,
                waves=waves,
                queries_per_s=inp.queries / search_s,
                coordinator_memory_gib=coordinator_bytes / GIB,
                neighbours=neighbours,
            ),
            pretrain=dict(seconds=pretrain_s, images=selected, epochs=inp.pretrain_epochs),
        ),
        storage_gib=dict(
            embeddings=n * (inp.dim * 2 + 8) / GIB,
            index=idx_bytes / GIB,
            selected_shards=selected * prof.image_bytes / GIB,
        ),
    )


def format_plan(plan: dict) -> str:
    s, st = plan["stages"], plan["storage_gib"]
    inp = plan["inputs"]
    rows = [
        f"plan for {inp['images']:,} images of dim {inp['dim']} on {inp['devices']} devices / {inp['nodes']} nodes "
        f"(profile: {plan['profile']})",
        f"index: {plan['factory']}  ({plan['factory_reason']})",
        "",
        f"{'stage':<9} {'wall time':>11}  detail",
        f"{'embed':<9} {_hms(s['embed']['seconds']):>11}  {s['embed']['images_per_s']:,.0f} img/s ({s['embed']['bound']}-bound)",
        f"{'index':<9} {_hms(s['index']['seconds']):>11}  {s['index']['shards']} shard(s), "
        f"{s['index']['memory_gib']:,.1f} GiB in memory and on disk",
        f"{'select':<9} {_hms(s['select']['seconds']):>11}  {s['select']['searchers']} searcher(s) in "
        f"{s['select']['waves']} wave(s), {s['select']['queries_per_s']:,.0f} queries/s; coordinator "
        f"{s['select']['coordinator_memory_gib']:,.1f} GiB ({COORDINATOR_BYTES_PER_SELECTED} B a selected sample, "
        f"benchmarks/select_memory.py, + {NEIGHBOUR_BYTES} B for each of {s['select']['neighbours']:,} neighbours)",
        f"{'pretrain':<9} {_hms(s['pretrain']['seconds']):>11}  {s['pretrain']['images']:,} images x "
        f"{s['pretrain']['epochs']:g} epochs",
        "",
        f"storage: embeddings {st['embeddings']:,.1f} GiB, index {st['index']:,.1f} GiB, "
        f"selected shards {st['selected_shards']:,.1f} GiB",
    ]
    return "\n".join(rows)


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def calibrate(path: str, *, seconds_per_probe: float = 3.0) -> Profile:
    """Measure this machine's throughputs with small probes of sept's own code paths."""
    import faiss
    import numpy as np
    import torch

    from sept.index.codes import encode_shard, train_index
    from sept.training.encoder import build_backbone

    torch.manual_seed(0)
    backbone, dim = build_backbone("resnet18_small")
    backbone.eval()
    batch = torch.randn(64, 3, 32, 32)

    def rate(fn, units: int) -> float:
        fn()  # warm-up
        t, done = time.perf_counter(), 0
        while time.perf_counter() - t < seconds_per_probe:
            fn()
            done += units
        return done / (time.perf_counter() - t)

    with torch.no_grad():
        embed_rate = rate(lambda: backbone(batch), 64)
    opt = torch.optim.SGD(backbone.parameters(), lr=0.01)

    def train_step():
        opt.zero_grad()
        backbone(torch.cat([batch, batch])).pow(2).mean().backward()
        opt.step()

    backbone.train()
    pretrain_rate = rate(train_step, 64)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50_000, 128)).astype("float32")
    t = time.perf_counter()
    trained = train_index(faiss.index_factory(128, "IVF256,PQ32"), x[:20_000])
    train_s = time.perf_counter() - t
    encode_rate = rate(lambda: encode_shard(trained, x, np.arange(len(x))), len(x))
    index = faiss.clone_index(trained)
    index.add(x)
    faiss.ParameterSpace().set_index_parameter(index, "nprobe", 16)
    search_rate = rate(lambda: index.search(x[:1000], 100), 1000)
    blob = os.urandom(64 * 2**20)
    probe = f"{path}.readprobe"
    with open(probe, "wb") as f:
        f.write(blob)

    def read_probe() -> None:
        with open(probe, "rb") as f:
            f.read()

    read_rate = rate(read_probe, 64) / 1.048576
    os.remove(probe)
    prof = Profile(
        name=f"{platform.node()} ({os.cpu_count()} CPUs, no GPU)"
        if not torch.cuda.is_available()
        else f"{platform.node()} ({torch.cuda.get_device_name(0)})",
        source=f"sept plan --calibrate on {time.strftime('%Y-%m-%d')}: resnet18_small at 32 px, "
        "IVF256,PQ32 on 128-d vectors, a 64 MiB file read",
        embed_images_per_s_per_device=round(embed_rate, 1),
        index_encode_vectors_per_s_per_node=round(encode_rate, 1),
        index_train_s=round(train_s, 2),
        search_queries_per_s_per_shard=round(search_rate, 1),
        pretrain_images_per_s_per_device=round(pretrain_rate, 1),
        read_mb_per_s_per_node=round(read_rate, 1),
        image_bytes=1500.0,
    )
    prof.save(path)
    return prof

"""A run sharded over two CPU processes (torchrun, gloo) makes the same images, bit for bit, and
the same tables as one process; the group's primitives deal work evenly and carry rank 0's
results and errors to every rank."""

from __future__ import annotations

import json
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import FAST, ONE_THREAD, cli

from fia_bench import distributed
from fia_bench.errors import FiaBenchError

ARGS = ["model=tiny_random", "method=uce", "seeds=1", "n_concepts=[1]", *FAST]
FAST_BATCH = 4  # sampler.batch_size in FAST: rank totals differ by at most one batch
TABLES = ("records.csv", "runs.csv", "summary.csv", "tests.csv", "report.md")


def images(cache: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (cache / "images").rglob("*.png")}


def test_two_cpu_ranks_make_what_one_process_makes(tmp_path: Path, cache_dir: Path) -> None:
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    # a fresh one-thread process, as each rank is: scores computed in this test process could
    # carry the rounding of whatever thread count and kernels earlier tests left behind
    cli([*ARGS, f"hydra.run.dir={single}"], cache_dir, tmp_path, env=ONE_THREAD)
    launcher = ["--standalone", "--nproc_per_node", "2", "-m", "fia_bench"]
    cli(
        [*launcher, *ARGS, f"hydra.run.dir={sharded}"],
        tmp_path / "cache_2",
        tmp_path,
        module="torch.distributed.run",
        env=ONE_THREAD,
    )

    reference = images(cache_dir)
    assert reference and images(tmp_path / "cache_2") == reference
    for name in TABLES:
        assert (sharded / name).read_bytes() == (single / name).read_bytes(), name
    one = json.loads((single / "manifest.json").read_text())["counts"]
    two = json.loads((sharded / "manifest.json").read_text())["counts"]
    assert one["images_by_rank"] == [len(reference)] == [two["images_generated"]]
    # both ranks worked, in near-equal shares, and no image was made twice
    assert len(two["images_by_rank"]) == 2 and min(two["images_by_rank"]) > 0
    assert abs(two["images_by_rank"][0] - two["images_by_rank"][1]) <= FAST_BATCH
    leftovers = [p for p in (tmp_path / "cache_2").rglob("*") if p.suffix in (".lock", ".tmp")]
    assert leftovers == []


def test_shards_cover_every_item_once_and_stay_balanced_across_calls() -> None:
    size, lists = 3, [list(range(n)) for n in (5, 1, 2, 7, 4)]
    ranks = [distributed.Group(rank, size) for rank in range(size)]
    totals = [0] * size
    for items in lists:
        shares = [group.shard(items) for group in ranks]
        assert sorted(x for share in shares for x in share) == items
        totals = [t + len(s) for t, s in zip(totals, shares, strict=True)]
        assert max(totals) - min(totals) <= 1
    solo = distributed.Group(1, size, solo=True)
    assert solo.shard([1, 2, 3]) == [1, 2, 3]


def rank_main(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    group = distributed.current()
    seen: dict[str, object] = {"rank": group.rank}
    seen["from_main"] = group.from_main(lambda: f"made by {group.rank}")
    seen["gather"] = group.gather(group.rank * 10)

    def compute() -> dict[str, object]:
        # rank 0 computes alone: nested steps inside it are not sharded
        return {"solo": group.solo, "shard": group.shard([1, 2, 3])}

    seen["leader"] = group.leader(compute)
    seen["after"] = group.sharded

    def fail() -> None:
        raise ValueError("boom")

    try:
        group.leader(fail)
    except (ValueError, FiaBenchError) as err:
        seen["error"] = f"{type(err).__name__}: {err}"
    dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(seen))


def test_leader_hands_results_and_errors_to_every_rank(tmp_path: Path) -> None:
    mp.spawn(rank_main, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank in seen:
        assert rank["from_main"] == "made by 0"
        assert rank["gather"] == [0, 10]
        assert rank["leader"] == {"solo": True, "shard": [1, 2, 3]}
        assert rank["after"] is True
    assert seen[0]["error"] == "ValueError: boom"
    assert seen[1]["error"] == "FiaBenchError: rank 0 stopped the run: ValueError: boom"

"""The Ray Data path (one local Ray start for the module) gives the same manifest as the plain loop."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from train.curate.dedup import run_dedup
from train.curate.profile import run_profile

from .conftest import cfg

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised inside Ray Data


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from train.curate.engine import ray_init

    ray_init(cfg(engine="ray", workers=2))
    yield ray
    ray.shutdown()


def test_ray_engine_matches_local(tmp_path, dup_set, ray_local):
    root, truth = dup_set
    local = run_profile(root, tmp_path / "local", cfg(shard_size=3))
    remote = run_profile(root, tmp_path / "ray", cfg(shard_size=3, engine="ray", workers=2))
    assert len(list((tmp_path / "ray" / ".shards" / "profile").glob("part-*.parquet"))) == 4
    assert pq.read_table(remote).equals(pq.read_table(local))
    for d in ("local", "ray"):
        run_dedup(tmp_path / d / "manifest.parquet", tmp_path / d, cfg())
    a, b = (pq.read_table(tmp_path / d / "manifest.parquet") for d in ("local", "ray"))
    assert a.equals(b) and sum(1 for x in a.column("duplicate_of").to_pylist() if x) == len(truth)

"""Running a per-image stage over shards: a plain in-process loop, or a Ray Data pipeline.

The input list is cut into shards of ``shard_size`` items. A shard's result is a Parquet file under
``OUT/.shards/<stage>/`` written atomically, so a file that exists is complete: a second run skips it
(resume), and a run whose inputs or options changed starts the stage over. The shards are then streamed into
one manifest, one shard in memory at a time.

``engine = "ray"`` runs the same shard function as a Ray Data pipeline (``from_items`` of the shards ->
``map_batches`` on a pool of actors that each build the worker once, e.g. load the OCR model, then write
their shards). Without ``RAY_ADDRESS`` Ray starts in-process on all local cores, quietly and without its
dashboard; with ``RAY_ADDRESS`` the same command runs on that cluster (the input and output folders must
then be on storage every node sees).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from .config import CurateConfig, CurateError
from .manifest import pa, write_table, write_text

log = logging.getLogger(__name__)

Worker = Callable[[list[dict]], object]  # items of one shard -> a pyarrow Table


def shard_dir(out: Path, stage: str) -> Path:
    return Path(out) / ".shards" / stage


def part_name(i: int) -> str:
    return f"part-{i:05d}.parquet"


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:24]


def run_shards(
    stage: str,
    items: list[dict],
    factory: Callable[[], Worker],
    out: Path,
    cfg: CurateConfig,
    options_digest: str,
    unit: str = "img",
) -> list[Path]:
    """Run ``factory()(shard_items)`` over every unfinished shard; returns the shard files in order.

    ``factory`` must be picklable (a module-level function or a ``functools.partial`` of one) for Ray.
    """
    sd = shard_dir(out, stage)
    n = cfg.shard_size
    shards = [items[i : i + n] for i in range(0, len(items), n)]
    plan = {"stage": stage, "n_items": len(items), "shard_size": n, "options": options_digest, "items": _digest(items)}
    plan_file = sd / "plan.json"
    if plan_file.is_file():
        try:
            old = json.loads(plan_file.read_text(encoding="utf-8"))
        except ValueError:
            old = None
        if old != plan:
            log.warning("%s: the inputs or options changed since the last run; recomputing every shard", stage)
            shutil.rmtree(sd)
    sd.mkdir(parents=True, exist_ok=True)
    if not plan_file.is_file():
        write_text(plan_file, json.dumps(plan))
    for tmp in sd.glob("*.tmp"):  # leftovers of a killed write
        tmp.unlink(missing_ok=True)
    files = [sd / part_name(i) for i in range(len(shards))]
    todo = [i for i, f in enumerate(files) if not f.is_file()]
    done_items = sum(len(shards[i]) for i in range(len(shards)) if i not in set(todo))
    if done_items:
        log.info("%s: %d of %d shards already done, continuing", stage, len(shards) - len(todo), len(shards))
    if todo:
        if cfg.engine == "ray":
            _run_ray(stage, shards, todo, factory, sd, cfg, done_items, len(items), unit)
        else:
            _run_local(stage, shards, todo, factory, sd, cfg, done_items, len(items), unit)
    return files


def _bar(stage, total, initial, unit, cfg):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=stage, unit=unit, disable=None if cfg.progress else True)


def _run_local(stage, shards, todo, factory, sd, cfg, done, total, unit) -> None:
    worker = factory()
    with _bar(stage, total, done, unit, cfg) as bar:
        for i in todo:
            write_table(worker(shards[i]), sd / part_name(i))
            bar.update(len(shards[i]))


class _RayShards:
    """A Ray Data actor: builds the worker once, then turns batches of shard records into shard files."""

    def __init__(self, factory, shard_dir: str):
        self.worker = factory()
        self.dir = Path(shard_dir)

    def __call__(self, batch):
        out_shard, out_rows = [], []
        for i, items in zip(batch["shard"], batch["items"]):
            its = json.loads(items)
            write_table(self.worker(its), self.dir / part_name(int(i)))
            out_shard.append(int(i))
            out_rows.append(len(its))
        return {"shard": out_shard, "rows": out_rows}


def ray_init(cfg: CurateConfig):
    """Connect to ``RAY_ADDRESS`` or start a quiet local Ray on all cores (reused when already running)."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise CurateError("engine = 'ray' needs Ray Data: pip install -e '.[curate]' (or 'ray[data]').") from e
    if not ray.is_initialized():
        kw = {
            "include_dashboard": False,
            "log_to_driver": False,
            "logging_level": logging.WARNING,
            "configure_logging": True,
            "ignore_reinit_error": True,
        }
        if not os.environ.get("RAY_ADDRESS"):
            kw["num_cpus"] = cfg.workers or os.cpu_count() or 1
        ray.init(**kw)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours is the one bar per stage
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return ray


def _run_ray(stage, shards, todo, factory, sd, cfg, done, total, unit) -> None:
    ray = ray_init(cfg)
    workers = cfg.workers or int(ray.cluster_resources().get("CPU", 1))
    records = [{"shard": i, "items": json.dumps(shards[i])} for i in todo]
    ds = ray.data.from_items(records, override_num_blocks=len(records)).map_batches(
        _RayShards,
        fn_constructor_kwargs={"factory": factory, "shard_dir": str(sd)},
        batch_size=1,
        concurrency=max(1, min(workers, len(records))),
        num_cpus=1,
    )
    with _bar(stage, total, done, unit, cfg) as bar:
        for row in ds.iter_rows():
            bar.update(int(row["rows"]))
    missing = [i for i in todo if not (sd / part_name(i)).is_file()]
    if missing:
        raise CurateError(f"{stage}: the Ray pipeline finished without writing shard(s) {missing[:5]}; run it again.")


def merge(files: list[Path], dest: Path) -> Path:
    """Concatenate shard files into ``dest`` (atomically), one shard in memory at a time."""
    from .manifest import write_tables

    pyarrow = pa()
    tables = (pyarrow.parquet.read_table(f) for f in files)
    return write_tables(tables, dest, f"nothing to write to '{dest}' (no shard).", cast=True)

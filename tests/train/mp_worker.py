"""Runs training jobs in a process of a 2-process gloo group (spawned by tests/train/test_multiprocess.py).

Each job is ``(config file, overrides)``; the jobs run one after another in the same process group, so the
cost of starting the processes is paid once. Accelerate's process state is reset between jobs.
"""

from __future__ import annotations

import os
import traceback


def worker(rank: int, world: int, port: int, jobs: list, errors: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )
    import torch

    torch.set_num_threads(1)
    try:
        from accelerate.state import AcceleratorState, GradientState, PartialState

        from train.config import load_config
        from train.run import make_runner

        for config, overrides in jobs:
            runner = make_runner(load_config(config, overrides), progress=False)
            runner.train()
            AcceleratorState._reset_state(False)
            GradientState._reset_state()
            PartialState._shared_state.pop("_cpu", None)
    except BaseException:  # noqa: BLE001 - reported to the test through a file
        with open(f"{errors}.{rank}", "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()

"""Data-parallel training on PyTorch's own engine: `torch.distributed` under `torchrun`.

    torchrun --nproc-per-node 2 -m peftlab train ...       (or: peftlab train --nproc 2 ...)

Every process loads the same model and data, draws the same global batch, and trains on its
own contiguous share of the rows: with N processes and a global batch of B rows, rank r
takes rows [r·B/N, (r+1)·B/N). Gradients are averaged across processes (DDP, or FSDP2's
reduce-scatter), and each process's loss is weighted by its share of the batch's target
tokens, so N processes compute the single-process gradient of the same global batch.

DDP keeps a whole model per process; FSDP2 (`fully_shard` per decoder block, then the root)
keeps a 1/N shard of every parameter, gathers a block's weights just for its forward and
backward, and keeps gradients and optimizer moments only for the trainable shards. gloo on
the CPU, NCCL on GPUs. Only rank 0 writes files.
"""

import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from .errors import UserError


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """True inside a process started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device) -> torch.device:
    """Join the process group torchrun set up (once); return this process's device.

    On GPUs each process takes the GPU of its local rank. On the CPU the machine's cores are
    split between the local processes (torchrun would otherwise pin every process to one
    thread)."""
    if not launched():
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise UserError(f"process {local} has no GPU: {torch.cuda.device_count()} visible for "
                            f"{os.environ.get('LOCAL_WORLD_SIZE')} processes per node")
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // per_node))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    return device


def shard_rows(batch: torch.Tensor) -> torch.Tensor:
    """This process's contiguous share of a global batch's rows."""
    n, r = world_size(), rank()
    per = len(batch) // n
    return batch[r * per : (r + 1) * per]


def check_batch(batch_size: int) -> None:
    n = world_size()
    if batch_size % n:
        raise UserError(f"--batch-size {batch_size} must be a multiple of the {n} processes (each takes an equal share)")


def all_sum(values: list[float], device) -> list[float]:
    """Sum a few numbers over all processes (one small collective); identity in one process."""
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_sum_tensor(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
    return t


def wrap(module: nn.Module, fsdp: bool, blocks, compute_dtype: torch.dtype) -> nn.Module:
    """The data-parallel form of `module` (a loss module around the model).

    DDP: a wrapper whose backward all-reduces gradients bucket by bucket. FSDP2: the module
    itself, sharded in place; each decoder block is its own unit (gathered just for its
    forward and backward), the rest (embeddings, final norm, head, prompts) the root's. In bf16
    a block holds bf16 frozen weights beside fp32 trainable ones; FSDP gathers one dtype per
    unit, so trainable shards are gathered as bf16 for compute and their gradients reduced in
    fp32 (the same casts autocast makes in one process)."""
    if not dist.is_initialized():
        return module
    if not fsdp:
        from torch.nn.parallel import DistributedDataParallel

        device = next(module.parameters()).device
        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy()
    if compute_dtype != torch.float32:
        policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(module, mp_policy=policy)
    return module


def is_sharded(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on the CPU (gathered from every process when sharded: a collective)."""
    if is_sharded(t):
        t = t.full_tensor()
    return t.detach().to("cpu")


def like(value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`value` (a whole tensor) laid out as `target`: this process's shard when it is sharded."""
    if is_sharded(target):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(value.to(target.device_mesh.device_type), target.device_mesh, target.placements,
                                 src_data_rank=None)
    return value.to(target.device)


@contextmanager
def whole_model(model: nn.Module):
    """Inside: every parameter of an FSDP-sharded model is whole on every process (for saving
    with the ordinary code that reads modules); resharded on exit. A no-op otherwise."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in units:
        m.unshard()
    try:
        yield model
    finally:
        for m in units:
            m.reshard()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def finish() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


EXIT_DIR = "PEFTLAB_EXIT_DIR"  # where each worker of `launch` leaves its exit code


def report_exit(code: int) -> None:
    """A worker started by `launch`: leave this process's exit code for the launcher."""
    folder = os.environ.get(EXIT_DIR)
    if folder and launched():
        import signal

        # The command is over: torchrun's SIGTERM to the survivors of a failed worker must not
        # kill this process before its code is written (the launcher would lose what it said).
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, signal.SIG_IGN)
        (Path(folder) / f"rank-{rank()}").write_text(str(code))


def launch(nproc: int, argv: list[str], env: dict | None = None) -> tuple[int, str]:
    """`peftlab train --nproc N ...`: run the same command under torchrun with N processes.

    Signals reach the workers through torchrun (SIGTERM/SIGINT make each one finish its
    step and checkpoint). Returns the exit code (0, 2 for a user error, 128+signal, or 1)
    and, when a worker died without a word of its own, which one and how ("" otherwise)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "--tee=0", "-m", "peftlab", *argv]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc))),
               **(env or {}))
    exits = tempfile.mkdtemp(prefix="peftlab-exits-")
    env[EXIT_DIR] = exits
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, errors="replace")
    import signal
    import threading

    got, died = [], {}

    def forward(signum, frame):
        got.append(signum)
        proc.send_signal(signum)

    def relay():
        for line in worker_lines(proc.stderr, died):
            sys.stderr.write(line)
            sys.stderr.flush()

    reader = threading.Thread(target=relay, daemon=True)
    reader.start()
    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    reader.join(timeout=10)
    reports = {int(f.name.removeprefix("rank-")): int(f.read_text() or 1) for f in Path(exits).glob("rank-*")}
    shutil.rmtree(exits, ignore_errors=True)
    code = exit_code(code, got[0] if got else None, reports, nproc)
    silent = sorted(set(range(nproc)) - set(reports))
    if code != 1 or not silent or got:
        return code, ""
    who = next((r for r in died if r in silent), silent[0])  # torchrun names the first to fail
    return code, _death(who, died.get(who))


_TORCHRUN_FAILED = r"failed \(exitcode: (-?\d+)\) local_rank: (\d+)"  # torchrun names the first worker to fail


def worker_lines(lines, died: dict):
    """The stderr lines a user should see: the workers' lines, once each (every rank may say the
    same), and not torchrun's own report of a failed worker (glog lines, its traceback), which
    follows a worker's line that already said what went wrong. A line of ours ("peftlab: ...")
    always passes, even once torchrun's report has begun: the two write to one pipe, so a
    worker's last words can arrive in the middle of it. Records in `died` (rank -> exit code,
    negative for a signal) the worker torchrun names as the first to fail."""
    import re

    noise, said = False, set()
    for line in lines:
        if m := re.search(_TORCHRUN_FAILED, line):
            died.setdefault(int(m.group(2)), int(m.group(1)))
        noise = noise or line.startswith("Traceback") or bool(re.match(r"[EWIF]\d{4} ", line))
        if (noise and not line.startswith("peftlab:")) or line in said:
            continue
        said.add(line)
        yield line


def _death(rank: int, code: int | None) -> str:
    import signal

    if code is not None and code < 0 and -code in signal.valid_signals():
        how = f"killed by {signal.Signals(-code).name}"
    else:
        how = "it ended" if code is None else f"exit {code}"
    return f"training process {rank} failed ({how}, without a message of its own)"


def exit_code(torchrun: int, signum: int | None, reports: dict, nproc: int) -> int:
    """The launcher's exit code from torchrun's, the signal we passed on (None: none), the codes
    the workers wrote (rank -> code) and how many workers there were."""
    failed = set(reports.values()) - {0}
    if torchrun and signum is None:
        own = {c for c in failed if c < 128}  # 128+n is torchrun stopping the others after one failed
        if own:  # the first failure's own code says what happened; a crash (1) wins over a refusal (2)
            return 1 if 1 in own else max(own)
        if len(reports) < nproc:  # a worker died without reporting (killed from outside, out of memory)
            return 1
        if failed:  # every worker stopped on a signal nobody passed through us (sent to them directly)
            return max(failed)
    return 128 + signum if signum is not None and torchrun else torchrun

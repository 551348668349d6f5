"""A failure on one process of a distributed run: each rank's own marker (``FAILED.rank<N>`` beside rank 0's
``FAILED``) and rank 0's note of what the others said, so that the real error is not lost behind gloo's or NCCL's
"connection closed by peer". One process alone is rank 0 and writes ``FAILED`` as before."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

FAILED = "FAILED"  # a failed run's marker (rank 0's, or a process alone)


def process_rank() -> str:
    """This process's global rank, as a label: ``"0"`` for rank 0 or a process alone. The process group's rank
    once it exists, else the launcher's (torchrun's ``RANK``, an srun task's ``SLURM_PROCID``, Lightning's
    ``LOCAL_RANK`` on node ``NODE_RANK``)."""
    import sys

    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return str(dist.get_rank())
    for key in ("RANK", "SLURM_PROCID"):
        if os.environ.get(key):
            return str(int(os.environ[key]))
    local, node = int(os.environ.get("LOCAL_RANK") or 0), int(os.environ.get("NODE_RANK") or os.environ.get("GROUP_RANK") or 0)
    return str(local) if not node else f"{node}.{local}"  # (node.local: the global number needs the node's size)


def distributed() -> bool:
    """This process is one of several of a distributed run (its launcher's world size, or its process group's)."""
    import sys

    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    return any(int(os.environ.get(key) or 1) > 1 for key in ("WORLD_SIZE", "SLURM_NTASKS"))


def failure_marker(run_dir: str | os.PathLike) -> Path:
    """Where this process marks a failed run: ``FAILED`` on rank 0 (or alone), ``FAILED.rank<N>`` on rank N, so that
    a rank's own error is kept beside rank 0's, which is often only the lost connection to that rank."""
    rank = process_rank()
    return Path(run_dir) / (FAILED if rank == "0" else f"{FAILED}.rank{rank}")


#: how gloo and NCCL report a collective whose peer process ended (crashed, killed)
PEER_LOST = ("closed by peer", "reset by peer", "remote worker crashing", "NCCL communicator was aborted", "ncclRemoteError")


def peer_failures(exc: BaseException, run_dir: str | os.PathLike, wait: float = 2.0) -> str:
    """For rank 0's error ``exc`` that is a lost connection to another rank (`PEER_LOST`): what the other ranks'
    markers (`failure_marker`) say, ``"rank N failed: <its first line> (FAILED.rankN has its traceback)"`` (waiting
    up to ``wait`` seconds for one to appear), or, where there is none (a killed rank), where to look; "" for any
    other error. Noted on ``exc``: the marker and the ``error:`` line ask once."""
    import time

    if getattr(exc, "_mtl_peers", None) is not None:
        return exc._mtl_peers
    run_dir = Path(run_dir)
    if not any(text in str(exc) for text in PEER_LOST):
        return ""
    # (Lightning's local DDP: its rank environment is undone when the job ends, but the other ranks' job logs stay)
    if not distributed() and not any(run_dir.glob("*_ddp_process_*.log")):
        return ""  # one process: a network error of its own
    deadline = time.monotonic() + wait
    while True:
        markers = sorted(run_dir.glob(f"{FAILED}.rank*"))
        if markers or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    said = []
    for marker in markers:
        try:
            line = marker.read_text().split("\n", 1)[0].strip()
        except OSError:
            continue
        said.append(f"rank {marker.name[len(FAILED) + 5:]} failed: {line} ({marker.name} has its traceback)")
    resume = run_dir / "checkpoints" / "last.ckpt"
    note = "; ".join(said) or (
        "another rank ended without an error of its own (killed, e.g. out of memory?): see its "
        "train_ddp_process_<N>.log in the run folder" + (f"; resume with ckpt_path={resume}" if resume.is_file() else ""))
    with contextlib.suppress(AttributeError, TypeError):
        exc._mtl_peers = note
    return note


def stale_rank_markers(run_dir: str | os.PathLike) -> None:
    """Remove the other ranks' markers of an earlier attempt in ``run_dir`` (rank 0 replaces its verdict)."""
    for marker in Path(run_dir).glob(f"{FAILED}.rank*"):
        marker.unlink(missing_ok=True)


def led_by_peers(message: str, exc: BaseException, run_dir: str | os.PathLike) -> str:
    """Rank 0's ``message`` for its error ``exc``, led by what the other ranks said (`peer_failures`) when ``exc`` is
    a lost connection to them: ``"<peers>; rank 0: <message>"``; else ``message``."""
    peers = peer_failures(exc, run_dir)
    return f"{peers}; rank 0: {message}" if peers else message

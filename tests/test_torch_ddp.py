"""stochdepth.torch under torch.distributed: two gloo processes on localhost (CPU only).

Both ranks are seeded identically (torch.manual_seed and the module seed). By default each rank
must still draw its own mask - the key of rank r is `rank_seed(seed, r)` - and with
`sync_across_ranks=True` both ranks must draw the same one. Bounded: the whole test gives up
after 90 s instead of hanging on a stuck rendezvous.
"""

from __future__ import annotations

import os
import socket
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

pytestmark = [
    pytest.mark.torch,
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                       reason="torch.distributed with gloo is not available"),
]

BATCH, P, SEED, STEPS = 256, 0.5, 1234, 2


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _masks(module, two_input):
    rows = []
    for _ in range(STEPS):
        x = torch.ones(BATCH, 3)
        out = module(torch.zeros_like(x), x) if two_input else module(x)
        rows.append((out[:, 0] != 0).to(torch.uint8))
    return torch.stack(rows)


def _worker(rank, world, port, outdir):
    import stochdepth.torch as sdt

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=__import__("datetime").timedelta(seconds=30))
    try:
        torch.manual_seed(0)  # the same everywhere, on purpose
        results = {
            "seeded": _masks(sdt.DropPath(1 - P, seed=SEED).train(), False),
            "seeded_sync": _masks(sdt.DropPath(1 - P, seed=SEED, sync_across_ranks=True).train(),
                                  False),
            "two_input": _masks(sdt.StochasticDepth(P, seed=SEED), True),
            "unseeded": _masks(sdt.DropPath(1 - P).train(), False),
        }
        torch.manual_seed(0)
        results["unseeded_sync"] = _masks(sdt.DropPath(1 - P, sync_across_ranks=True).train(),
                                          False)
        gathered = {}
        for name, local in results.items():
            parts = [torch.empty_like(local) for _ in range(world)]
            dist.all_gather(parts, local)
            gathered[name] = torch.stack(parts).numpy()
        if rank == 0:
            np.savez(os.path.join(outdir, "masks.npz"), **gathered)
    finally:
        dist.destroy_process_group()


# A rendezvous that fails for the machine's reasons (the free port taken by another process
# between _free_port and the bind, a connection reset or timed out under load) is retried on a
# fresh port; any other failure, and a run past its deadline, fails the test at once.
TRANSIENT = ("DistNetworkError", "DistStoreError", "Address already in use", "EADDRINUSE",
             "Connection reset", "Connection refused", "Connection closed", "timed out",
             "Timeout", "Broken pipe")
ATTEMPTS = 3


def _run_ranks(outdir):
    """Runs both ranks once; returns None on success, else the transient error's text."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(_worker, args=(2, _free_port(), outdir), nprocs=2,
                             join=False, start_method="spawn")
    # spawn re-imports torch in each rank: ~15-30 s on a loaded 2-core machine
    deadline = time.monotonic() + 90
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail("the 2-process gloo run did not finish within 90 s")
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
        if any(t in str(e) for t in TRANSIENT):
            return str(e)
        raise
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
    return None


def test_transient_errors_are_recognised():
    # The retry is for rendezvous failures only: a wrong mask is not among them.
    assert any(t in "torch.distributed.DistNetworkError: Connection reset by peer"
               for t in TRANSIENT)
    assert not any(t in "AssertionError: masks differ" for t in TRANSIENT)


@pytest.mark.timeout(300)  # two processes, a process group
def test_two_ranks_independent_by_default_identical_when_synced(tmp_path):
    import stochdepth.torch as sdt

    import stochdepth

    errors = []
    for attempt in range(ATTEMPTS):
        outdir = tmp_path / f"attempt{attempt}"
        outdir.mkdir()
        error = _run_ranks(str(outdir))
        if error is None:
            break
        errors.append(error)
    else:
        pytest.fail(f"the gloo rendezvous failed {ATTEMPTS} times:\n" + "\n".join(errors))
    tmp_path = outdir
    m = dict(np.load(tmp_path / "masks.npz"))  # [rank, step, batch]

    for name in ("seeded", "two_input", "unseeded"):
        assert not np.array_equal(m[name][0], m[name][1]), name  # independent per rank
    for name in ("seeded_sync", "unseeded_sync"):
        np.testing.assert_array_equal(m[name][0], m[name][1], err_msg=name)
    # exactly the documented keys: rank r uses rank_seed(SEED, r); sync uses SEED itself
    for rank in range(2):
        for step in range(STEPS):
            np.testing.assert_array_equal(
                m["seeded"][rank, step],
                stochdepth.mask(BATCH, P, seed=sdt.rank_seed(SEED, rank), offset=step))
            np.testing.assert_array_equal(m["two_input"][rank, step], m["seeded"][rank, step])
            np.testing.assert_array_equal(m["seeded_sync"][rank, step],
                                          stochdepth.mask(BATCH, P, seed=SEED, offset=step))

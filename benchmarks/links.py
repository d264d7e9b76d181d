"""Point-to-point latency and bandwidth between two processes, measured the way the pipeline
engine sends (isend / irecv): the numbers behind a cluster preset's links.

    python benchmarks/links.py            # gloo on this machine's CPUs
    python benchmarks/links.py --cuda     # NCCL between GPUs 0 and 1

Prints a table of message size, one-way time and bandwidth, then the fitted alpha-beta
(latency + bytes / bandwidth) parameters.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SIZES = [4 * 2**10, 64 * 2**10, 256 * 2**10, 2**20, 4 * 2**20, 16 * 2**20]


def _worker(rank: int, port: int, cuda: bool, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=2)
    device = torch.device(f"cuda:{rank}") if cuda else torch.device("cpu")
    results = []
    for size in SIZES:
        t = torch.ones(size // 4, device=device)
        times = []
        for rep in range(30):
            dist.barrier()
            t0 = time.perf_counter()
            if rank == 0:
                dist.isend(t, 1).wait()
                dist.irecv(t, 1).wait()
            else:
                dist.irecv(t, 0).wait()
                dist.isend(t, 0).wait()
            if cuda:
                torch.cuda.synchronize(device)
            if rep >= 5:
                times.append((time.perf_counter() - t0) / 2)  # one way
        results.append((size, statistics.median(times)))
    if rank == 0:
        out.put(results)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cuda", action="store_true")
    args = ap.parse_args()
    from planner.execute.single import free_port

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, args.cuda, q)) for r in range(2)]
    for p in procs:
        p.start()
    results = q.get(timeout=300)
    for p in procs:
        p.join()
    print(f"{'bytes':>10} {'one way':>10} {'GB/s':>8}")
    for size, t in results:
        print(f"{size:>10} {t * 1e6:>8.0f} us {size / t / 1e9:>8.2f}")
    # alpha-beta fit on the smallest and largest messages
    (s0, t0), (s1, t1) = results[0], results[-1]
    bw = (s1 - s0) / (t1 - t0)
    lat = t0 - s0 / bw
    print(f"fit: latency {lat * 1e6:.0f} us, bandwidth {bw / 1e9:.2f} GB/s")


if __name__ == "__main__":
    main()

"""Cluster presets and the ``--cluster`` syntax.

    h100x8                  one node of 8 H100-80GB on NVLink
    2xh100x8                two such nodes on InfiniBand
    a100-80gbx4+a100-40gbx4 a node of 4 A100-80GB and a node of 4 A100-40GB
    cpu2                    two CPU processes (gloo), for tests and laptops
    cpu4                    four CPU processes (gloo), for tensor parallelism and ZeRO
    path/to/cluster.json    anything else, in the cluster format

Bandwidths are per direction, per GPU, from the vendors' datasheets; latencies are typical
small-message NCCL point-to-point latencies. CPU links were measured with gloo on loopback.

A node holds at most ``MAX_DEVICES_PER_NODE`` devices: 72 is the largest NVLink domain built as one
node (NVIDIA's GB200 NVL72 rack), so ``h100x9000`` is refused and ``1125xh100x8`` is the way to
write 9,000 GPUs. A cluster holds at most ``MAX_DEVICES`` devices in all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from planner.errors import InputError
from planner.formats import Cluster, DeviceSpec, Link, NodeSpec, load_cluster_file
from planner.units import foreign_digits

GiB = 1024**3
MiB = 1024**2

MAX_DEVICES_PER_NODE = 72  # NVL72-class nodes: one NVLink domain of 72 GPUs
MAX_DEVICES = 65536


@dataclass(frozen=True)
class DeviceKind:
    device: DeviceSpec
    intra: Link  # between devices of one node
    inter: Link  # between nodes, per device
    reserved_bytes: int  # runtime context and communication buffers
    per_node: int = 8  # how many a typical node holds (the suggestion for a count too large)


# NVLink 4 (H100 SXM): 900 GB/s bidirectional per GPU; NDR InfiniBand: 400 Gb/s per GPU.
_H100 = DeviceKind(DeviceSpec(name="H100-80GB", type="cuda", memory_bytes=81559 * MiB),
                   Link(bandwidth_bytes_per_s=450e9, latency_s=10e-6),
                   Link(bandwidth_bytes_per_s=50e9, latency_s=20e-6), 1 * GiB)
# H200 SXM: 141 GB HBM3e (torch reports 150,109,880,320 bytes), NVLink 4 and NDR as the H100.
_H200 = DeviceKind(DeviceSpec(name="H200-141GB", type="cuda", memory_bytes=150_109_880_320),
                   _H100.intra, _H100.inter, 1 * GiB)
# NVLink 3 (A100 SXM): 600 GB/s bidirectional per GPU; HDR InfiniBand: 200 Gb/s per GPU.
_A100_40 = DeviceKind(DeviceSpec(name="A100-40GB", type="cuda", memory_bytes=40960 * MiB),
                      Link(bandwidth_bytes_per_s=300e9, latency_s=10e-6),
                      Link(bandwidth_bytes_per_s=25e9, latency_s=20e-6), 1 * GiB)
_A100_80 = DeviceKind(DeviceSpec(name="A100-80GB", type="cuda", memory_bytes=81920 * MiB),
                      _A100_40.intra, _A100_40.inter, 1 * GiB)
# PCIe 4.0 x16: 16 GT/s x 16 lanes with 128b/130b encoding = 31.5 GB/s per direction; consumer
# cards have no peer-to-peer, so a transfer crosses host memory. 10 GbE between nodes.
_RTX4090 = DeviceKind(DeviceSpec(name="RTX4090-24GB", type="cuda", memory_bytes=24564 * MiB),
                      Link(bandwidth_bytes_per_s=31.5e9, latency_s=20e-6),
                      Link(bandwidth_bytes_per_s=1.25e9, latency_s=50e-6), 1 * GiB, per_node=4)
# gloo over loopback between two processes, measured on a 2-core machine (benchmarks/links.py):
# 90 us latency, 3.2 GB/s, and about 250 us of the receiving thread per message; the engine
# spends about 50 us of Python per action.
_CPU = DeviceKind(DeviceSpec(name="cpu", type="cpu", memory_bytes=4 * GiB, action_overhead_s=50e-6),
                  Link(bandwidth_bytes_per_s=3.2e9, latency_s=90e-6, cpu_s=250e-6),
                  Link(bandwidth_bytes_per_s=1.25e9, latency_s=100e-6, cpu_s=250e-6), 0, per_node=2)

KINDS: dict[str, DeviceKind] = {
    "h100": _H100, "h100-80gb": _H100, "h200": _H200,
    "a100": _A100_40, "a100-40gb": _A100_40, "a100-80gb": _A100_80,
    "rtx4090": _RTX4090, "4090": _RTX4090, "consumer24": _RTX4090,
    "cpu": _CPU,
}

PRESETS = {
    "h100x8": "a node of 8 H100-80GB on NVLink",
    "h200x8": "a node of 8 H200-141GB on NVLink",
    "a100-40gbx8": "a node of 8 A100-40GB on NVLink",
    "a100-80gbx8": "a node of 8 A100-80GB on NVLink",
    "rtx4090x4": "a workstation of 4 RTX 4090 24 GB on PCIe",
    "cpu2": "two CPU processes (gloo)",
    "cpu4": "four CPU processes (gloo), for tensor parallelism and ZeRO tests",
    "2xh100x8": "two nodes of 8 H100-80GB on InfiniBand",
}



@dataclass(frozen=True)
class Peaks:
    """A device's datasheet peaks, dense (no structured sparsity): arithmetic by dtype, and memory
    bandwidth. float32 is the plain FP32 rate: PyTorch does not use TF32 for float32 matrix
    products unless told to (torch.backends.cuda.matmul.allow_tf32 is False by default)."""

    flops_per_s: dict[str, float]
    bandwidth_bytes_per_s: float
    source: str


# NVIDIA H100 Tensor Core GPU datasheet (SXM5): FP32 67 TFLOPS, BF16/FP16 Tensor 1,979 TFLOPS
# with sparsity (989.5 dense), HBM3 3.35 TB/s.
_H100_PEAKS = Peaks({"float32": 67e12, "bfloat16": 989.5e12, "float16": 989.5e12}, 3.35e12,
                    "NVIDIA H100 Tensor Core GPU datasheet, SXM5")
# NVIDIA H200 Tensor Core GPU datasheet (SXM): the H100's arithmetic, HBM3e 4.8 TB/s.
_H200_PEAKS = Peaks(_H100_PEAKS.flops_per_s, 4.8e12, "NVIDIA H200 Tensor Core GPU datasheet, SXM")
# NVIDIA A100 Tensor Core GPU datasheet (SXM): FP32 19.5 TFLOPS, BF16/FP16 Tensor 312 TFLOPS dense,
# HBM2 1,555 GB/s (40 GB) and HBM2e 2,039 GB/s (80 GB).
_A100_40_PEAKS = Peaks({"float32": 19.5e12, "bfloat16": 312e12, "float16": 312e12}, 1.555e12,
                       "NVIDIA A100 Tensor Core GPU datasheet, SXM 40GB")
_A100_80_PEAKS = Peaks(_A100_40_PEAKS.flops_per_s, 2.039e12, "NVIDIA A100 Tensor Core GPU datasheet, SXM 80GB")
# NVIDIA Ada GPU architecture whitepaper, appendix table for the RTX 4090: FP32 82.6 TFLOPS,
# FP16/BF16 Tensor with FP32 accumulate 165.2 TFLOPS dense, GDDR6X 1,008 GB/s.
_RTX4090_PEAKS = Peaks({"float32": 82.6e12, "bfloat16": 165.2e12, "float16": 165.2e12}, 1.008e12,
                       "NVIDIA Ada GPU architecture whitepaper, GeForce RTX 4090")

PEAKS: dict[int, Peaks] = {id(_H100): _H100_PEAKS, id(_H200): _H200_PEAKS, id(_A100_40): _A100_40_PEAKS,
                           id(_A100_80): _A100_80_PEAKS, id(_RTX4090): _RTX4090_PEAKS}


def device_peaks(name: str) -> tuple[DeviceKind, Peaks]:
    """The device kind named as ``--cluster`` names it (``h100``) and its peaks."""
    kind = KINDS.get(name.lower())
    peaks = PEAKS.get(id(kind)) if kind is not None else None
    if kind is None or peaks is None:
        known = ", ".join(sorted(n for n, k in KINDS.items() if id(k) in PEAKS))
        raise InputError(f"--estimate {name!r}: no datasheet peaks for it; choose one of {known}")
    return kind, peaks


def kinds() -> list[tuple[list[str], DeviceKind]]:
    """Each device kind once, with every name ``--cluster`` accepts for it."""
    grouped: dict[int, tuple[list[str], DeviceKind]] = {}
    for name, kind in KINDS.items():
        grouped.setdefault(id(kind), ([], kind))[0].append(name)
    return list(grouped.values())


def describe_link(link: Link) -> str:
    """'450 GB/s, 10 us' (decimal GB/s, as datasheets give them); gloo adds its CPU time."""
    text = f"{link.bandwidth_bytes_per_s / 1e9:g} GB/s, {link.latency_s * 1e6:g} us"
    return text + (f" (+{link.cpu_s * 1e6:g} us CPU)" if link.cpu_s else "")


_TERM = re.compile(r"(?:([0-9]+)x)?([a-z0-9][a-z0-9-]*?)x?([0-9]+)")  # [0-9]: \d takes any script's digits


def _term(text: str) -> tuple[int, DeviceKind, int]:
    """'2xh100x8' -> (2 nodes, H100, 8 per node); 'cpu2' -> (1, CPU, 2)."""
    if foreign_digits(text):
        raise InputError(f"cluster {text!r}: write the counts with the digits 0-9")
    m = _TERM.fullmatch(text)
    if not m or m.group(2) not in KINDS:
        known = ", ".join(sorted(set(KINDS)))
        raise InputError(f"unknown cluster {text!r}: write [NODESx]DEVICExCOUNT with DEVICE one of "
                         f"{known} (e.g. h100x8, 2xh100x8, cpu2), or give a cluster JSON file")
    nodes = int(m.group(1) or 1)
    count = int(m.group(3))
    kind = KINDS[m.group(2)]
    if nodes < 1 or count < 1:
        raise InputError(f"cluster {text!r}: node and device counts must be at least 1")
    if count > MAX_DEVICES_PER_NODE:
        raise InputError(f"cluster {text!r}: {count} devices in one node is more than a node holds "
                         f"(at most {MAX_DEVICES_PER_NODE}, an NVL72-class node); for many nodes "
                         f"write NODESxDEVICExCOUNT, e.g. {_suggest(m.group(2), kind, count * nodes)}")
    if nodes * count > MAX_DEVICES:
        raise InputError(f"cluster {text!r}: {nodes * count:,} devices is more than planner handles "
                         f"(at most {MAX_DEVICES:,})")
    return nodes, kind, count


def _suggest(name: str, kind: DeviceKind, total: int) -> str:
    """'h100', 9000 devices -> '1125xh100x8': nodes as large as the kind's typical node or the
    largest smaller size that divides the total, so the suggestion has the same device count."""
    per = max(d for d in range(1, kind.per_node + 1) if total % d == 0)
    return f"{total // per}x{name}x{per}"


def from_spec(spec: str, *, memory_bytes: int | None = None) -> Cluster:
    """A cluster from a preset expression or a JSON file path."""
    spec = spec.strip()
    path = Path(spec)
    if spec.endswith(".json") or path.is_file():
        return _plausible(load_cluster_file(path), str(path))
    nodes: list[NodeSpec] = []
    kinds: list[DeviceKind] = []
    for text in spec.lower().split("+"):
        n, kind, count = _term(text)
        dev = kind.device
        if memory_bytes is not None:
            dev = dev.model_copy(update={"memory_bytes": memory_bytes})
        for _ in range(n):
            nodes.append(NodeSpec(name=f"node{len(nodes)}", devices=[dev] * count))
            kinds.append(kind)
    intra = min((k.intra for k in kinds), key=lambda link: link.bandwidth_bytes_per_s)
    inter = min((k.inter for k in kinds), key=lambda link: link.bandwidth_bytes_per_s)
    return Cluster(name=spec.lower(), nodes=nodes, intra_node=intra,
                   inter_node=inter if len(nodes) > 1 else None,
                   reserved_bytes=max(k.reserved_bytes for k in kinds))


def _plausible(cluster: Cluster, where: str) -> Cluster:
    """A cluster file within the same limits as the preset syntax."""
    largest = max(len(node.devices) for node in cluster.nodes)
    if largest > MAX_DEVICES_PER_NODE:
        raise InputError(f"{where}: a node of {largest} devices is more than a node holds (at most "
                         f"{MAX_DEVICES_PER_NODE}, an NVL72-class node): split it into nodes")
    if len(cluster.devices) > MAX_DEVICES:
        raise InputError(f"{where}: {len(cluster.devices):,} devices is more than planner handles "
                         f"(at most {MAX_DEVICES:,})")
    return cluster

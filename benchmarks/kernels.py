"""Microbenchmarks of the fused kernels: DINO cross-entropy (forward + backward), the loss block of one student
head (its last layer and the DINO terms that read it), and the EMA update.

    python benchmarks/kernels.py --device cpu --batch 8 32 --dim 65536 --local-crops 10 --json FILE
    python benchmarks/kernels.py --device cuda --batch 8 32 --json FILE
    python benchmarks/kernels.py --device cpu --ops head_loss --batch 8 --threads 1 --json FILE

``head_loss`` is the loss block of one MLP-Head as a MOKD step runs it: the weight-normalised last layer
(bottleneck -> K) on every crop, then L_sm and L_cm (two teachers, two centres) and the backward to the last
layer's input and weight. ``per_term`` builds the [crops*batch, K] logits and calls dino_cross_entropy per term
(the default path); ``fused_terms`` (CUDA) one fused pass over those logits; ``fused_head`` never builds them.

The CPU rows include ``native`` (the C++ operators of csrc/, when built). On a shared CPU add --threads 1: with
two intra-op threads, every op waits for a thread the other load has
descheduled (measured here: a 30 ms call became 170 ms), while one thread degrades gracefully.

What is measured, per op and implementation, against the reference timed in the same run:
  * median_ms: median wall time of the call over --repeats runs after warm-up (CUDA: synchronised).
  * peak_extra_bytes: the most memory the call holds beyond its inputs, outputs such as the gradient included.
    CUDA: torch.cuda.max_memory_allocated minus the allocation before the call. CPU: replayed from torch.profiler's
    memory timeline (every tensor CREATE/DESTROY of the call, profile_memory=True) in a separate, untimed run;
    RSS deltas are useless here because glibc keeps freed pages and the timing runs reuse them.
  * gbps: bytes that must move / time. DINO CE: student read + teacher read + gradient write, at their dtypes.
    EMA: target read + source read + target write.
  * floor_fraction: (bytes / copy bandwidth) / time, the bandwidth measured in the same run on two preallocated
    1 GiB tensors (CPU: 512 MiB) as the better of dst.copy_(src) and dst.add_(src) (see copy_gbps). A fresh
    clone() is not used: on CPU it times page faults (2.7 GB/s here against 9.7 for copy_ and 13.6 for add_).
Inputs are cosine-similarity-like logits in [-1, 1], as DINO's weight-normalised last layer of an L2-normalised
vector produces (far larger logits make exp underflow to denormals, which is a different, slower code path on CPU).
"""

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

# The CPU memory replay (peak_extra_bytes) runs torch.profiler once per measured call, and each run makes kineto
# log to stderr: "USDT ... profiler_start" and "profiler_stop", plus "ERROR ... gpuGetDeviceCount failed" where a
# CUDA build finds no GPU; dozens of lines around the table, none about the benchmark. KINETO_LOG_LEVEL is the
# lowest severity kineto prints, read when the profiler first starts; in torch 2.14's kineto 5 still prints the
# USDT lines and 6 prints nothing (measured). A level the caller exported is kept.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mokd.engine.runtime import peak_extra_bytes  # noqa: E402
from mokd.kernels import (DinoTarget, EmaPlan, dino_cross_entropy, ema_per_tensor_, fused_head,  # noqa: E402
                          fused_terms, native)

TAU_S, TAU_T, MOMENTUM = 0.1, 0.04, 0.996
# What each op's speed-up is measured against: the literal DINO loss, and DINO's per-tensor EMA loop.
REFERENCE = {"dino_ce": "reference", "ema": "dino_loop", "head_loss": "per_term"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------------------------------------------
# measurement
# ----------------------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fns: dict[str, Callable[[], None]], device: torch.device, repeats: int, warmup: int) -> dict[str, float]:
    """Median wall time of each function. The functions take turns, run after run, so that a change in the
    machine's load during the measurement (a shared CPU) affects every implementation alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def copy_gbps(device: torch.device, repeats: int) -> float:
    """Streaming bandwidth: the better of dst.copy_(src) (read + write) and dst.add_(src) (2 reads + write).

    copy_ alone under-reports on CPU: the write first reads each destination line (write-allocate), traffic the
    byte count does not see; an in-place update reads its destination anyway."""
    n = (1 << 30 if device.type == "cuda" else 1 << 29) // 4
    src, dst = torch.rand(n, device=device), torch.rand(n, device=device)
    times = median_ms({"copy": lambda: dst.copy_(src), "add": lambda: dst.add_(src)}, device, max(repeats, 5), 2)
    return max(2 * n * 4 / (times["copy"] * 1e-3), 3 * n * 4 / (times["add"] * 1e-3)) / 1e9


# ----------------------------------------------------------------------------------------------------------------
# DINO cross-entropy
# ----------------------------------------------------------------------------------------------------------------


def identity_formulation(student, teacher, centre, n_crops, n_views, batch):
    """The torch path's identity, CE = lse(s / tau_s) - <p, s> / tau_s, in plain differentiable ops (no chunking,
    no custom backward): the graph torch.compile gets to fuse."""
    k = student.shape[1]
    s = student.float()
    p = torch.softmax((teacher.float() - centre) / TAU_T, dim=-1).view(n_views, batch, k)
    lse = torch.logsumexp(s / TAU_S, dim=-1).view(n_crops, batch)
    s = s.view(n_crops, batch, k)
    same = min(n_crops, n_views)
    cross = (p.sum(0) * s.sum(0)).sum() - (p[:same] * s[:same]).sum()
    weights = torch.tensor([n_views - (u < n_views) for u in range(n_crops)], device=s.device, dtype=s.dtype)
    n_pairs = n_crops * n_views - same
    return ((weights[:, None] * lse).sum() - cross / TAU_S) / (n_pairs * batch)


def bench_dino_ce(args, device, dtype, batch, copy_bw):
    n_views, n_crops, k = 2, 2 + args.local_crops, args.dim
    gen = torch.Generator(device=device).manual_seed(batch)
    student = (torch.rand(n_crops * batch, k, generator=gen, device=device) * 2 - 1).to(dtype).requires_grad_(True)
    teacher = (torch.rand(n_views * batch, k, generator=gen, device=device) * 2 - 1).to(dtype)
    centre = torch.rand(k, generator=gen, device=device) * 0.2 - 0.1
    element = student.element_size()
    moved = (2 * n_crops + n_views) * batch * k * element

    impls: dict[str, Callable[[], torch.Tensor]] = {
        name: (lambda name=name: dino_cross_entropy(student, teacher, centre, TAU_S, TAU_T, batch, impl=name).loss)
        for name in ("reference", "torch")
    }
    notes = {}
    try:
        compiled = torch.compile(identity_formulation, dynamic=False)
        impls["torch_compile"] = lambda: compiled(student, teacher, centre, n_crops, n_views, batch)
        impls["torch_compile"]().backward()  # compile both graphs now: a failure is caught here, not in the timing
        student.grad = None
    except Exception as err:  # noqa: BLE001 - any compiler failure means "skip with a note"
        impls.pop("torch_compile", None)
        notes["torch_compile"] = f"skipped: torch.compile failed on this machine ({type(err).__name__}: {err})"[:300]
    if device.type == "cpu" and native.available():
        impls["native"] = lambda: dino_cross_entropy(student, teacher, centre, TAU_S, TAU_T, batch, impl="native").loss
    if device.type == "cuda":
        impls["triton"] = lambda: dino_cross_entropy(
            student, teacher, centre, TAU_S, TAU_T, batch, impl="triton"
        ).loss

    steps = {}
    for name, loss_fn in impls.items():

        def step(loss_fn=loss_fn):
            student.grad = None
            loss = loss_fn()
            loss.backward()
            return loss

        steps[name] = step
    # Every implementation must agree with the reference before it is timed (on a GPU this is the check that
    # the compiled Triton kernels compute the right loss and gradient).
    reference_loss, reference_grad = steps["reference"]().item(), student.grad.float()
    grad_tolerance = 1e-4 if dtype == torch.float32 else 1e-2
    for name, step in steps.items():
        loss = step().item()
        grad_error = ((student.grad.float() - reference_grad).norm() / reference_grad.norm()).item()
        if not math.isclose(loss, reference_loss, rel_tol=1e-4) or grad_error > grad_tolerance:
            raise RuntimeError(
                f"dino_ce {name}: loss {loss} vs reference {reference_loss}, relative gradient error {grad_error:.2e}"
            )
    del reference_grad
    times = median_ms(steps, device, args.repeats, args.warmup)
    records = []
    for name, step in steps.items():
        student.grad = None
        ms = times[name]
        records.append(
            {
                "op": "dino_ce", "impl": name, "batch": batch, "median_ms": ms,
                "peak_extra_bytes": peak_extra_bytes(step, device), "bytes_moved": moved,
                "gbps": moved / (ms * 1e-3) / 1e9, "floor_fraction": moved / (copy_bw * 1e9) / (ms * 1e-3),
                "dim": k, "crops": f"{n_views}+{args.local_crops}", "dtype": str(dtype).removeprefix("torch."),
            }
        )
    for name, note in notes.items():
        records.append({"op": "dino_ce", "impl": name, "batch": batch, "median_ms": None, "peak_extra_bytes": None,
                        "gbps": None, "floor_fraction": None, "dim": k, "crops": f"{n_views}+{args.local_crops}",
                        "dtype": str(dtype).removeprefix("torch."), "note": note})
    return records


# ----------------------------------------------------------------------------------------------------------------
# the loss block of one head: last layer + the DINO terms reading it
# ----------------------------------------------------------------------------------------------------------------


def bench_head_loss(args, device, dtype, batch, copy_bw):
    n_views, n_crops, k, d = 2, 2 + args.local_crops, args.dim, args.bottleneck
    gen = torch.Generator(device=device).manual_seed(batch)
    features = torch.nn.functional.normalize(torch.randn(n_crops * batch, d, generator=gen, device=device), dim=-1)
    features = features.to(dtype).requires_grad_(True)
    weight = torch.nn.functional.normalize(torch.randn(k, d, generator=gen, device=device), dim=-1)
    weight = weight.to(dtype).requires_grad_(True)
    targets = [DinoTarget((torch.rand(n_views * batch, k, generator=gen, device=device) * 2 - 1).to(dtype),
                          torch.rand(k, generator=gen, device=device) * 0.2 - 0.1, TAU_T, batch, weight=w)
               for w in (1.0, 0.5)]  # L_sm and lambda * L_cm
    element = features.element_size()
    # What must move: the last layer's weight read in the forward and in the backward, its gradient written,
    # both teachers read (the student logits need not exist at all).
    moved = (3 * k * d + 2 * n_views * batch * k) * element

    def per_term():
        logits = torch.nn.functional.linear(features, weight)
        return sum(t.weight * dino_cross_entropy(logits, t.teacher, t.centre, TAU_S, t.temperature, batch).loss
                   for t in targets)

    impls: dict[str, Callable[[], torch.Tensor]] = {
        "per_term": per_term,
        "fused_head": lambda: fused_head(features, weight, TAU_S, targets).total,
    }
    if device.type == "cuda":
        impls["fused_terms"] = lambda: fused_terms(torch.nn.functional.linear(features, weight), TAU_S, targets).total

    def step(loss_fn):
        features.grad = weight.grad = None
        loss = loss_fn()
        loss.backward()
        return loss

    steps = {name: (lambda fn=fn: step(fn)) for name, fn in impls.items()}
    reference_loss = steps["per_term"]().item()
    reference_grads = [features.grad.float(), weight.grad.float()]
    grad_tolerance = 1e-4 if dtype == torch.float32 else 1e-2
    for name, run in steps.items():
        loss = run().item()
        errors = [((g.float() - r).norm() / r.norm()).item()
                  for g, r in zip((features.grad, weight.grad), reference_grads)]
        if not math.isclose(loss, reference_loss, rel_tol=1e-4) or max(errors) > grad_tolerance:
            raise RuntimeError(f"head_loss {name}: loss {loss} vs per_term {reference_loss}, "
                               f"relative gradient errors {errors}")
    del reference_grads
    times = median_ms(steps, device, args.repeats, args.warmup)
    records = []
    for name, run in steps.items():
        features.grad = weight.grad = None
        ms = times[name]
        records.append({
            "op": "head_loss", "impl": name, "batch": batch, "median_ms": ms,
            "peak_extra_bytes": peak_extra_bytes(run, device), "bytes_moved": moved,
            "gbps": moved / (ms * 1e-3) / 1e9, "floor_fraction": moved / (copy_bw * 1e9) / (ms * 1e-3),
            # The weight's gradient ([K, d], in every path's peak): peak_extra_bytes minus it is the loss block's
            # own working memory.
            "weight_grad_bytes": k * d * element,
            "dim": k, "bottleneck": d, "crops": f"{n_views}+{args.local_crops}", "terms": len(targets),
            "dtype": str(dtype).removeprefix("torch."),
        })
    return records


# ----------------------------------------------------------------------------------------------------------------
# EMA over an R101 + ViT-B pair with their DINO heads
# ----------------------------------------------------------------------------------------------------------------


def pair_parameter_shapes(dim: int) -> list[torch.Size]:
    """Shapes of every parameter of R101 and ViT-B/16 (timm, no classifier) plus each one's DINO MLP-Head
    (Linear(C,2048)-GELU-Linear(2048,2048)-GELU-Linear(2048,256), weight-normalised Linear(256, dim))."""
    import timm

    shapes = []
    with torch.device("meta"):
        for name, width in (("resnet101", 2048), ("vit_base_patch16_224", 768)):
            shapes += [p.shape for p in timm.create_model(name, num_classes=0).parameters()]
            for fan_in, fan_out in ((width, 2048), (2048, 2048), (2048, 256)):
                shapes += [torch.Size([fan_out, fan_in]), torch.Size([fan_out])]
            shapes += [torch.Size([dim, 256]), torch.Size([dim, 1])]  # weight_v, weight_g
    return shapes


def bench_ema(args, device, copy_bw):
    shapes = pair_parameter_shapes(args.dim)
    gen = torch.Generator(device=device).manual_seed(0)
    teacher = [torch.randn(shape, generator=gen, device=device) for shape in shapes]
    student = [torch.randn(shape, generator=gen, device=device) for shape in shapes]
    n_params = sum(t.numel() for t in teacher)
    moved = 3 * n_params * 4

    def foreach_mul_add():
        torch._foreach_mul_(teacher, MOMENTUM)
        torch._foreach_add_(teacher, student, alpha=1 - MOMENTUM)

    # mokd's EMA as the trainer runs it: the plan (grouping, device pointer tables) is built once, then each
    # step is one update: the Triton kernel on CUDA, torch._foreach_lerp_ on CPU.
    plan = EmaPlan(teacher, student)
    impls = {"dino_loop": lambda: ema_per_tensor_(teacher, student, MOMENTUM), "foreach_mul_add": foreach_mul_add,
             "foreach_lerp": lambda: torch._foreach_lerp_(teacher, student, 1 - MOMENTUM),
             "triton" if device.type == "cuda" else "ema_plan": lambda: plan.update(MOMENTUM)}
    if device.type == "cpu" and native.available():
        impls["native"] = lambda: torch.ops.mokd.ema_(teacher, student, 1 - MOMENTUM)
    times = median_ms(impls, device, args.repeats, args.warmup)
    records = []
    for name, fn in impls.items():
        ms = times[name]
        records.append(
            {
                "op": "ema", "impl": name, "batch": None, "median_ms": ms,
                "peak_extra_bytes": peak_extra_bytes(fn, device), "bytes_moved": moved,
                "gbps": moved / (ms * 1e-3) / 1e9,
                "floor_fraction": moved / (copy_bw * 1e9) / (ms * 1e-3), "dim": args.dim, "crops": None,
                "dtype": "float32", "n_params": n_params, "n_tensors": len(shapes),
            }
        )
    return records


# ----------------------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------------------


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "cpu"
    return f"{model}, {os.cpu_count()} cores"


def print_table(records: list[dict]) -> None:
    header = (
        f"{'op':9} {'impl':16} {'batch':>5} {'median ms':>10} {'x ref':>7} {'peak MiB':>9} {'GB/s':>7} {'floor':>6}"
    )
    print(header)
    print("-" * len(header))
    for r in records:
        if r["median_ms"] is None:
            print(f"{r['op']:9} {r['impl']:16} {r['batch'] or '':>5} {r['note']}")
            continue
        peak = "" if r["peak_extra_bytes"] is None else f"{r['peak_extra_bytes'] / 2**20:9.1f}"
        print(
            f"{r['op']:9} {r['impl']:16} {r['batch'] or '':>5} {r['median_ms']:10.2f} "
            f"{r['speedup_vs_reference']:7.2f} {peak:>9} {r['gbps']:7.2f} {r['floor_fraction']:6.1%}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, nargs="+", default=[32], help="images per step (several allowed)")
    parser.add_argument("--dim", type=int, default=65536, help="K, the DINO head's output dimension")
    parser.add_argument("--local-crops", type=int, default=10, help="student crops beyond the 2 global ones")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="dtype of the logits")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs (default: cpu 5, cuda 30)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--ops", nargs="+", default=["dino_ce", "ema"], choices=["dino_ce", "ema", "head_loss"])
    parser.add_argument("--bottleneck", type=int, default=256, help="head_loss: the last layer's input width")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    parser.add_argument("--json", default=None, help="write the records to this file")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 30 if args.device == "cuda" else 5
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")

    # CPU timings are only as good as the machine is idle: the load of other processes is recorded with them.
    load = os.getloadavg()[0]
    copy_bw = copy_gbps(device, args.repeats)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    capability = native.cpu_capability() if device.type == "cpu" and native.available() else None
    print(f"device {device_name}, {torch.get_num_threads()} threads, load {load:.2f}, "
          f"streaming bandwidth {copy_bw:.1f} GB/s, native kernels: {capability or 'not built'}")
    records = []
    if "dino_ce" in args.ops:
        for batch in args.batch:
            records += bench_dino_ce(args, device, DTYPES[args.dtype], batch, copy_bw)
    if "head_loss" in args.ops:
        for batch in args.batch:
            records += bench_head_loss(args, device, DTYPES[args.dtype], batch, copy_bw)
    if "ema" in args.ops:
        records += bench_ema(args, device, copy_bw)
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    reference = {(r["op"], r["batch"]): r["median_ms"] for r in records if r["impl"] == REFERENCE[r["op"]]}
    for r in records:
        ref_ms = reference[(r["op"], r["batch"])]
        r["speedup_vs_reference"] = None if r["median_ms"] is None else ref_ms / r["median_ms"]
        r.update({"device": device_name, "threads": torch.get_num_threads(), "copy_gbps": copy_bw,
                  "load_average_1min_before": load, "torch": torch.__version__, "date": date,
                  "native_capability": capability})
    print_table(records)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
        print(f"wrote {len(records)} records to {args.json}")


if __name__ == "__main__":
    main()

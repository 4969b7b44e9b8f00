"""What a training step spends its time on: a torch.profiler capture of a few steps, summarised.

Asked for by issue 18 of a GPU run (mixed precision gave only 1.14x over fp32): is a step bound by the
device's math, by the host launching work, by waiting for the data loader, or by host-device
synchronisations, and does any matrix math still run in fp32 under autocast? `CVTK_JOB_PROFILE=SKIP,STEPS`
makes `train` capture STEPS training iterations after the first SKIP (rank 0 only) and write `profile.json`
(this summary) and `profile.trace.json` (a Chrome trace: chrome://tracing, Perfetto) into the run's workspace
(the folder beside the weights). On the CPU the device columns are absent and the syncs are `.item()` calls;
on CUDA they are the runtime's synchronisations and synchronous copies.
"""

import collections
import os

from .errors import UserError

PROFILE_HOOK = "CVTK_JOB_PROFILE"

# Host calls that wait for the device, as the CUDA runtime records them: explicit synchronisations and
# synchronous copies. A `.item()`, a `.cpu()` or a `nonzero` each issues one (an async copy, then a stream
# synchronisation), so on CUDA these alone are counted: counting `.item()`'s own operator too counted it twice.
DEVICE_WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
# Without a device (or runtime events), the host reads of a scalar: `.item()`, as the training code would do them.
HOST_READS = ("aten::_local_scalar_dense",)
# The math that autocast should run in half precision: one event per call (not the nested dispatches below them).
MATH_OPS = ("aten::convolution", "aten::convolution_backward", "aten::addmm", "aten::mm", "aten::bmm",
            "aten::baddbmm")
DATA_WAIT = "enumerate(DataLoader)"  # torch.profiler's record of fetching the next batch


def requested(environ=os.environ):
    """(skip, steps) from CVTK_JOB_PROFILE, or None when unset."""
    value = environ.get(PROFILE_HOOK, "").strip()
    if not value:
        return None
    try:
        skip, steps = (int(v) for v in value.split(","))
    except ValueError:
        skip = steps = -1
    if skip < 0 or steps < 1:
        raise UserError(f"{PROFILE_HOOK}={value!r}: expected SKIP,STEPS (iterations to skip, then to capture), "
                        f"for example {PROFILE_HOOK}=5,10")
    return skip, steps


def recorded_dtypes(prof):
    """{event id: its inputs' dtypes} from a finished torch.profiler.profile's own records. torch 2.13's events
    carry them (`input_dtypes`); torch 2.11's (the GPU machine's) do not, and without this every matrix product
    would count as half precision."""
    try:
        return {e.correlation_id(): e.dtypes() for e in prof.profiler.kineto_results.events()}
    except AttributeError:  # a torch without kineto results: the math share is then unknown, not guessed
        return {}


def summarize(events, steps, wall_seconds, dtypes=None):
    """A profiler's events (torch.profiler.profile().events()) over `steps` steps that took `wall_seconds` → a
    JSON-able summary, per step. `dtypes`: recorded_dtypes(profiler), for events without `input_dtypes`."""
    from torch.autograd import DeviceType

    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    host = [e for e in events if e.device_type == DeviceType.CPU]
    per = 1.0 / steps
    wall_ms = wall_seconds * 1000 * per
    math = collections.defaultdict(float)
    for e in host:
        if e.name in MATH_OPS:  # dtypes are recorded with record_shapes
            dtype = ((getattr(e, "input_dtypes", None) or (dtypes or {}).get(e.id) or [None])[0]) or "?"
            kind = "fp32" if dtype == "float" else "unknown" if dtype == "?" else "other"
            math[kind] += e.device_time_total if kernels else e.cpu_time_total
    known = math["fp32"] + math["other"]
    waits = DEVICE_WAITS if kernels and any(e.name.startswith("cuda") for e in host) else HOST_READS
    top_level = [e for e in host if e.name.startswith("aten::")
                 and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
    summary = {
        "steps": steps,
        "wall_ms_per_step": round(wall_ms, 3),
        "ops_per_step": round(len(top_level) * per, 1),
        "syncs_per_step": round(sum(e.name in waits for e in host) * per, 1),
        "data_wait_ms_per_step": round(sum(e.cpu_time_total for e in host if e.name.startswith(DATA_WAIT))
                                       / 1000 * per, 3),
        "math_in_fp32": round(math["fp32"] / known, 4) if known else None,
        "top_host_ops_ms_per_step": _top(host, lambda e: e.self_cpu_time_total, per),
    }
    if kernels:
        busy = sum(e.time_range.elapsed_us() for e in kernels) / 1000 * per
        summary.update(device_busy=round(min(1.0, busy / wall_ms), 4), kernels_per_step=round(len(kernels) * per, 1),
                       top_kernels_ms_per_step=_top(kernels, lambda e: e.time_range.elapsed_us(), per))
    return summary


def _top(events, time_us, per, n=12):
    totals = collections.Counter()
    for e in events:
        totals[e.name] += time_us(e)
    return [[name[:120], round(us / 1000 * per, 3)] for name, us in totals.most_common(n)]


def line(summary):
    """The summary in one log line."""
    text = (f"profile of {summary['steps']} steps: {summary['wall_ms_per_step']:.1f} ms per step, "
            f"{summary['ops_per_step']:.0f} ops and {summary['syncs_per_step']:.0f} host-device syncs per step, "
            f"data wait {summary['data_wait_ms_per_step']:.1f} ms per step")
    if summary.get("device_busy") is not None:
        text += f", device busy {summary['device_busy']:.0%}"
    if summary["math_in_fp32"] is not None:
        text += f", matrix math in fp32 {summary['math_in_fp32']:.0%}"
    return text

"""What a report states about the machine it ran on (CPU model, cores, threads, torch, device, date)."""
from __future__ import annotations

import datetime as _dt
import os
import platform

import torch

from .methods import active_backends, galore_status


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (else what ``platform`` knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def loadavg() -> list:
    """1, 5 and 15 minute load averages (NaN where the OS has none)."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return [round(x, 2) for x in load]


def machine_info() -> dict:
    """CPU model, cores, torch threads, torch version, device, Python, lrtrain and galore-torch versions,
    the compiled DLRT update backends, the date (UTC) and the load average."""
    from .. import __version__

    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = os.cpu_count()
    ok, galore = galore_status()
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": affinity,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": "cuda: " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (no GPU)",
        "python": platform.python_version(),
        "lrtrain": __version__,
        "galore_torch": galore if ok else "not importable",
        "fused_backends": active_backends(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg": loadavg(),
    }

"""What a report states about the machine: :func:`lrtrain.cli.bench.machine_info` and the galore-torch version."""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from lrtrain.cli.bench import machine_info as _lrtrain_machine_info


def installed_version(dist: str) -> str | None:
    """Installed version of distribution ``dist`` (None when absent), without importing it."""
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def machine_info(torch_threads: int | None = None) -> dict:
    """:func:`lrtrain.cli.bench.machine_info` plus ``galore_torch``: its installed version (it is not imported:
    that takes seconds; whether it imports is :func:`harness.methods.galore_status`)."""
    return dict(_lrtrain_machine_info(torch_threads), galore_torch=installed_version("galore-torch") or "not installed")

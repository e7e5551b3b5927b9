"""What every benchmark result records: device, date, versions, the command."""
from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

import torch


def environment(command: str) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    import diffusers
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    return {"device": device, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version,
            "diffusers": diffusers.__version__, "python": platform.python_version(), "command": command}


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)

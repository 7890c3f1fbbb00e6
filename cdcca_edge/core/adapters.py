"""Facts about the adapter directories AKD writes and the exporters and DWC read.

An AKD output directory is a PEFT adapter (``PeftModel.from_pretrained`` loads it). In
``bias-norm`` mode on architectures whose linear layers have biases, the bias deltas are
a second PEFT adapter (BEFT) in the subdirectory below: PEFT cannot hold LN tuning and
bias tuning in one model, and a merge must apply both.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from cdcca_edge.core.errors import require

BIAS_ADAPTER_DIR = "bias"


def lora_factors(adapter_dir: Path) -> dict[str, tuple[Any, Any, float]]:
    """HF weight name -> (A (r, in), B (out, r), scale) of a LoRA adapter; empty for other
    adapter types."""
    cfg_path = adapter_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("peft_type") != "LORA":
        return {}
    import numpy as np

    safetensors = require("safetensors.numpy", "cloud")
    sd = safetensors.load_file(str(adapter_dir / "adapter_model.safetensors"))
    r = cfg["r"]
    scale = cfg["lora_alpha"] / (math.sqrt(r) if cfg.get("use_rslora") else r)
    out = {}
    for k, a in sd.items():
        if k.endswith("lora_A.weight"):
            mod = k.replace("base_model.model.", "", 1).replace(".lora_A.weight", "")
            out[mod + ".weight"] = (a.astype(np.float32), sd[k.replace("lora_A", "lora_B")].astype(np.float32), scale)
    return out

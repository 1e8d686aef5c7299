"""GPU tests: marked ``gpu`` and skipped where torch sees no CUDA device (CI, the CPU development machine).

The tokenizer is the carried one on the GPU machine (``.gpu-carry/tokenizer``, written by
``bench/gpu/prepare_carry.sh``, because the GGUF package is not there), else the session's SmolLM2 one.
"""

from __future__ import annotations

from pathlib import Path

import pytest

CARRIED_TOKENIZER = Path(__file__).resolve().parents[2] / ".gpu-carry" / "tokenizer"


def pytest_collection_modifyitems(config, items):
    import torch

    here = Path(__file__).parent
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is false)")
    for item in items:
        if Path(str(item.fspath)).is_relative_to(here):
            item.add_marker(pytest.mark.gpu)
            if not torch.cuda.is_available():
                item.add_marker(skip)


@pytest.fixture(scope="session")
def gpu_tokenizer_dir(request) -> Path:
    if (CARRIED_TOKENIZER / "tokenizer_config.json").is_file():
        return CARRIED_TOKENIZER
    return request.getfixturevalue("tokenizer_dir")

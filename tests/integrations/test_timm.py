"""The timm example of docs/pytorch-loop.md, run where timm imports (it needs torchvision built for this torch)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "pytorch-loop.md"


def timm_block() -> str:
    blocks = [b for b in re.findall(r"```py\n(.*?)```", DOC.read_text(), re.S) if "import timm" in b]
    assert len(blocks) == 1, "docs/pytorch-loop.md should hold one timm example in a ```py block"
    return blocks[0]


def test_the_timm_example_is_documented():
    code = timm_block()
    assert "pretrained=False" in code and "initialize_from_loader_" in code
    compile(code, "pytorch-loop.md[timm]", "exec")


def test_the_timm_example_runs(tmp_path, monkeypatch):
    try:
        import timm  # noqa: F401
    except Exception as e:  # ImportError, or torchvision's RuntimeError beside a mismatched torch
        pytest.skip(f"timm does not import here ({type(e).__name__}: {e})")
    import torch

    monkeypatch.chdir(tmp_path)
    ns: dict = {"__name__": "__docs__"}
    exec(compile(timm_block(), "pytorch-loop.md[timm]", "exec"), ns)
    result, model = ns["result"], ns["model"]
    assert result.method == "gradinit" and result.scales
    assert all(torch.isfinite(p).all() for p in model.parameters())

"""The vector kernels' global stores in nvcc's PTX for sm_90 (tools/check_ptx.py; docs/design.md,
"CUDA"): every whole chunk is one 16-byte store. Needs nvcc, not a GPU; where the build is
expected to hold CUDA (STOCHDEPTH_EXPECT_CUDA=1, CI) a missing nvcc fails instead of skipping.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "check_ptx.py"


def load_tool():
    spec = importlib.util.spec_from_file_location("check_ptx", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_vector_kernel_stores_whole_chunks_as_one_16_byte_store():
    if shutil.which("nvcc") is None:
        if os.environ.get("STOCHDEPTH_EXPECT_CUDA") == "1":
            pytest.fail("STOCHDEPTH_EXPECT_CUDA=1 but nvcc is not on PATH")
        pytest.skip("nvcc is not on PATH")
    r = subprocess.run([sys.executable, str(TOOL), "--arch", "90"], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "DenseKernel<bfloat16, 8>" in r.stdout and "CompactKernel<float, 4>" in r.stdout
    assert "DenseKernel<bfloat16, 8, gamma>" in r.stdout


# Entry names as nvcc mangles run_kernel<K> in cuda/drop_path.cu.
DENSE_F32 = ("_ZN10stochdepth45_GLOBAL__N__5990fa36_12_drop_path_cu_c92de17a10run_kernelINS_"
             "11DenseKernelIfLi4ELb0EEEEEvNT_4ArgsE")
DENSE_GAMMA_F16 = ("_ZN10stochdepth45_GLOBAL__N__3a6f9116_12_drop_path_cu_c92de17a10run_kernelINS_"
                   "11DenseKernelI6__halfLi8ELb1EEEEEvNT_4ArgsE")
COMPACT_BF16 = ("_ZN10stochdepth45_GLOBAL__N__5990fa36_12_drop_path_cu_c92de17a10run_kernelINS_"
                "13CompactKernelI13__nv_bfloat16Li8EEEEEvNT_4ArgsE")


def ptx(name, stores):
    body = "\n".join(f"\t{s} \t[%rd{i}], %r{i};" for i, s in enumerate(stores))
    return f".entry {name}(\n\t.param .align 8 .b8 p[64]\n)\n{{\n{body}\n\tret;\n}}\n"


def test_the_check_refuses_a_split_vector_store():
    tool = load_tool()
    whole = ["st.global.wb.v4.u32"] * 4 + ["st.global.f32"] * 3  # 4 chunks, an element tail
    split = ["st.global.wb.v4.u32"] * 3 + ["st.global.u32"] * 4  # chunk 0 as 4 scalar stores
    assert [r[3] for r in tool.check(ptx(DENSE_F32, whole))] == ["ok"]
    (row,) = tool.check(ptx(DENSE_GAMMA_F16, ["st.global.wb.v4.u32"] * 3 + ["st.global.u32"]))
    assert row[0] == "DenseKernel<half, 8, gamma>" and "3 16-byte stores" in row[3]
    (row,) = tool.check(ptx(DENSE_F32, split))
    assert "3 16-byte stores, expected >= 4" in row[3]
    # The compact kernels have no element path: any narrower store is a split one.
    compact = ["st.global.v4.u32"] * 11 + ["st.global.v2.u16"] * 4
    (row,) = tool.check(ptx(COMPACT_BF16, compact))
    assert row[0] == "CompactKernel<bfloat16, 8>" and "stores of [4] bytes" in row[3]

"""benchmarks/compare_pytorch.py: its arithmetic on measured rounds, op grouping and argument errors (no PyTorch)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import compare_pytorch as cp  # noqa: E402
import compare_pytorch_breakdown as bd  # noqa: E402


def test_case_rows_rates_and_per_round_ratios():
    results = {
        "tfrobust": [{"wall": 2.0, "cpu": 1.0}, {"wall": 4.0, "cpu": 1.5}, {"wall": 1.0, "cpu": 1.0}],
        "pytorch": [{"wall": 3.0, "cpu": 2.0}, {"wall": 2.0, "cpu": 3.0}, {"wall": 4.0, "cpu": 2.0}],
    }
    row = cp.case_rows({"defense": "at"}, results, 64)
    assert row[0] == "at"
    assert row[1] == "21.3 / 32.0 / 16.0"  # 64 examples over 3, 2 and 4 s
    assert row[2] == "32.0 / 16.0 / 64.0"
    # per-round PyTorch / tfrobust times 1.5, 0.5, 4.0: median 1.5, range 0.5-4.0
    assert row[3] == "1.50x (0.50-4.00)"
    assert row[4] == f"{64 / 2.0:.1f}" and row[5] == f"{64 / 1.0:.1f}"  # medians of the CPU times
    assert row[6] == "2.00x (2.00-2.00)"


KINDS = {
    "_MklNativeConv2DBackpropInput": "convolution", "_MklNativePadWithConv2D": "convolution",
    "aten::convolution_backward": "convolution", "aten::native_batch_norm_backward": "BatchNorm",
    "FusedBatchNormV3": "BatchNorm", "_MklMatMul": "matrix product", "aten::addmm": "matrix product",
    "aten::copy_": "layout / copy", "Transpose": "layout / copy", "Cast": "cast", "aten::_to_copy": "cast",
    "ReluGrad": "other",
}


def test_op_kinds_of_both_frameworks():
    assert {op: bd.group_of(op) for op in KINDS} == KINDS
    assert bd.grouped({"Conv2D": 2.0, "_MklNativeConv2D": 1.5, "Mul": 0.25}) == {"convolution": 3.5, "other": 0.25}


def test_unknown_model_is_one_line_and_status_2(capsys):
    with pytest.raises(SystemExit) as e:
        cp.parse_args(["--models", "resnet50"])
    assert e.value.code == 2
    assert "--models: unknown model 'resnet50'; allowed: small_cnn, preact_resnet18, wide_resnet_swish_28_10" in (
        capsys.readouterr().err)


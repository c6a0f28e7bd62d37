"""The compiled clipping search picks what the numpy search picks."""

import shutil

import numpy as np
import pytest

from nanoexport.calibration import blocks, compiled
from nanoexport.calibration.blocks import WeightFormat, rtn

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                reason="torch.compile needs a C++ compiler for the CPU")

FORMATS = [WeightFormat("int4", 32), WeightFormat("uint4", 32), WeightFormat("int4", 64, asymmetric=True),
           WeightFormat("uint4", 128, asymmetric=True), WeightFormat("int8", 32),
           WeightFormat("int4", 32, scale_dtype="fp32")]


@pytest.fixture(scope="module")
def weight() -> np.ndarray:
    rng = np.random.default_rng(7)
    matrix = (rng.standard_normal((512, 2048)) * 0.02).astype(np.float32)
    matrix[:, :5] = 0  # all-zero blocks: the scale of 1 that stored_scale substitutes
    matrix[::97, 11] = 3.0  # outliers, which the narrowed ranges clip
    matrix[:32, 12] = -matrix[:32, 11]  # a block whose extreme is negative
    return matrix


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda fmt: f"{fmt.dtype}-{fmt.block_size}-"
                         f"{'asym' if fmt.asymmetric else 'sym'}-{fmt.scale_dtype}")
def test_the_compiled_search_stores_what_the_numpy_search_stores(weight, fmt, monkeypatch):
    assert weight.size >= compiled.COMPILED_MIN_ELEMENTS
    searched = rtn(weight, fmt)
    assert not compiled._failed, "the kernel did not compile: the numpy search answered both times"
    monkeypatch.setattr(blocks, "COMPILED_MIN_ELEMENTS", weight.size + 1)
    reference = rtn(weight, fmt)
    assert searched.values.dtype == reference.values.dtype
    np.testing.assert_array_equal(searched.values, reference.values)
    np.testing.assert_array_equal(searched.scales, reference.scales)
    if fmt.has_zero_point:
        np.testing.assert_array_equal(searched.zero_points, reference.zero_points)
    else:
        assert searched.zero_points is None

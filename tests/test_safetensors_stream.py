"""The streaming safetensors writer: the bytes ``safetensors.numpy.save_file`` writes for the same arrays, while
holding one tensor's bytes at a time (issue 16: every target's writer streams)."""

import tracemalloc

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.numpy import save, save_file

from nanoexport.targets.tvm import safetensors_stream
from nanoexport.targets.tvm.safetensors_stream import Source

NUMPY_DTYPES = {name: np.dtype(ml_dtypes.bfloat16 if name == "bfloat16" else name)
                for name in safetensors_stream.DTYPES}


def source(array: np.ndarray) -> Source:
    return Source(array.dtype.name, array.shape, lambda file: safetensors_stream.write_array(file, array))


def streamed(arrays: dict[str, np.ndarray], path) -> bytes:
    safetensors_stream.save_file({name: source(array) for name, array in arrays.items()}, path)
    return path.read_bytes()


@st.composite
def arrays(draw) -> np.ndarray:
    dtype = NUMPY_DTYPES[draw(st.sampled_from(sorted(NUMPY_DTYPES)))]
    shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))  # () and zero-size shapes included
    data = draw(st.binary(min_size=dtype.itemsize * int(np.prod(shape)), max_size=dtype.itemsize * int(np.prod(shape))))
    return np.frombuffer(data, np.uint8).view(dtype).reshape(shape)


# Names: any text, escapes and non-ASCII included, but not the key the format reserves for its metadata.
names = st.text(min_size=1, max_size=12).filter(lambda name: name != "__metadata__")


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(names, arrays(), max_size=8))
def test_streamed_file_is_the_bytes_save_file_writes(tmp_path_factory, tensors):
    path = tmp_path_factory.mktemp("stream") / "streamed.safetensors"
    assert streamed(tensors, path) == save(tensors)


def test_a_model_like_set_reads_back_equal(tmp_path):
    """Packed 4-bit bytes, fp16 scales, fp32 norms, int64 positions, a 0-d and an empty tensor: the same bytes as
    ``save_file`` and, read back with ``safe_open``, the same arrays."""
    random = np.random.default_rng(0)
    tensors = {
        "layers.0.mlp.down_proj.weight.T.quant": random.integers(0, 256, 4096, dtype=np.uint8),
        "layers.0.mlp.down_proj.weight.T.scale": random.standard_normal((64, 2)).astype(np.float16),
        "layers.0.input_layernorm.weight": random.standard_normal(128).astype(np.float32),
        "positions": np.arange(7, dtype=np.int64),
        "scalar": np.array(1.5, np.float32),
        "empty": np.zeros((0, 4), np.float16),
    }
    save_file(tensors, str(tmp_path / "reference.safetensors"))
    assert streamed(tensors, tmp_path / "streamed.safetensors") == (tmp_path / "reference.safetensors").read_bytes()
    with safe_open(str(tmp_path / "streamed.safetensors"), framework="numpy") as read:
        assert sorted(read.keys()) == sorted(tensors)
        for name, array in tensors.items():
            got = read.get_tensor(name)
            assert got.dtype == array.dtype and got.shape == array.shape and np.array_equal(got, array)


def test_a_wrong_byte_count_is_refused_by_name(tmp_path):
    short = Source("float32", (4,), lambda file: file.write(b"\0" * 12))
    with pytest.raises(ValueError, match="short: wrote 12 bytes, its dtype and shape take 16"):
        safetensors_stream.save_file({"short": short}, tmp_path / "bad.safetensors")


def test_writing_holds_one_tensor_at_a_time(tmp_path):
    """N tensors of M bytes each, produced when written: the traced peak (numpy's allocations are traced) stays
    within a few tensors, where the dict of arrays ``save_file`` takes holds all N."""
    count, size = 24, 1 << 20

    def produce(index: int) -> np.ndarray:
        return np.full(size, index, np.uint8)

    def write(index: int):
        return lambda file: file.write(produce(index).data)

    def peak(run) -> int:
        tracemalloc.start()
        try:
            run()
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    sources = {f"t{index:02d}": Source("uint8", (size,), write(index)) for index in range(count)}
    streaming = peak(lambda: safetensors_stream.save_file(sources, tmp_path / "streamed.safetensors"))
    whole = peak(lambda: save_file({name: produce(int(name[1:])) for name in sources},
                                   str(tmp_path / "whole.safetensors")))
    assert streaming < 3 * size, streaming
    assert whole >= count * size, whole  # the measure sees what the old way holds
    assert (tmp_path / "streamed.safetensors").read_bytes() == (tmp_path / "whole.safetensors").read_bytes()

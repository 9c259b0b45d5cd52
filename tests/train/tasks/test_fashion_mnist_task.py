"""Fashion-MNIST task: the IDX reader, the CNN, and a short run on a synthetic IDX folder."""

import pytest
import torch

from nibble.errors import DatasetError
from nibble.train.tasks.fashion_mnist import (
    DEFAULT_ROOT, FashionConfig, SmallCNN, load_split, read_idx, run_fashion_mnist,
)

from .idx_data import synthetic_fashion, write_idx


def test_read_idx_plain_and_gzipped(tmp_path):
    data = torch.randint(0, 256, (3, 4, 5), dtype=torch.uint8)
    for name in ("a.idx", "b.idx.gz"):
        assert torch.equal(read_idx(write_idx(tmp_path / name, data)), data)


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x02ab")  # float type code
    with pytest.raises(DatasetError, match="unsigned-byte"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05ab")
    with pytest.raises(DatasetError, match="expected 5 bytes"):
        read_idx(tmp_path / "short")
    with pytest.raises(DatasetError, match="dataset-fashion-mnist"):
        load_split(tmp_path, "train")


def test_small_cnn_shapes():
    model = SmallCNN(8)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model) == 4


def test_short_run_learns_the_synthetic_classes(tmp_path):
    folder = synthetic_fashion(tmp_path / "fmnist")
    result = run_fashion_mnist("ibm-fp4", 0, FashionConfig(epochs=3, batch_size=32, width=8, data=str(folder)),
                               progress=False)
    assert result["steps"] == 3 * (256 // 32)
    assert result["accuracy"] > 50  # chance is 10%
    assert result["quantized_layers"] == ["4", "7", "11"]
    assert result["step_time_s"] > 0 and result["step_cpu_s"] > 0


@pytest.mark.skipif(not (DEFAULT_ROOT / "t10k-labels-idx1-ubyte.gz").is_file(),
                    reason="dataset-fashion-mnist not installed")
def test_real_test_split_loads():
    split = load_split(None, "test")
    assert split.images.shape == (10000, 1, 28, 28) and split.labels.shape == (10000,)
    assert torch.equal(split.labels.bincount(), torch.full((10,), 1000))

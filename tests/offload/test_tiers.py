import pytest
import torch

from lightning_grass.offload import DiskTier, HostTier
from lightning_grass.offload.transfer import TensorSpec

TENSORS = [
    torch.randn(3, 5),
    torch.randn(7).to(torch.bfloat16),
    torch.tensor(12.0),
    torch.arange(6, dtype=torch.int64).reshape(2, 3),
]


@pytest.mark.parametrize(
    "make_tier", [lambda tmp: DiskTier(tmp), lambda tmp: HostTier(torch.device("cpu"))], ids=["disk", "host"]
)
def test_round_trip_is_bit_exact_for_every_dtype(tmp_path, make_tier):
    tier = make_tier(tmp_path)
    tier.write(3, TENSORS).wait()
    read, transfer = tier.read(3, [TensorSpec.of(t) for t in TENSORS])
    transfer.wait()
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(read, TENSORS, strict=True))
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(read, TENSORS, strict=True))
    assert tier.backing_bytes() == 15 * 4 + 7 * 2 + 4 + 6 * 8
    assert all(torch.equal(a, b) for a, b in zip(tier.read_to_cpu(3), TENSORS, strict=True))
    tier.close()


def test_disk_tier_writes_one_file_per_unit_and_deletes_them_on_close(tmp_path):
    tier = DiskTier(tmp_path)
    tier.write(0, TENSORS[:1]).wait()
    tier.write(1, TENSORS[1:]).wait()
    assert sorted(p.name for p in tier.directory.iterdir()) == ["state_00000.bin", "state_00001.bin"]
    assert tier.directory.parent == tmp_path
    tier.close()
    assert not tier.directory.exists()
    assert list(tmp_path.iterdir()) == []


def test_unwritable_offload_dir_is_refused_with_the_path(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match=rf"offload_dir='{blocker / 'sub'}' is not a writable directory"):
        DiskTier(blocker / "sub")

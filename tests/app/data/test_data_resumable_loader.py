"""``InstructionDataModule``'s training loader resumes where it stopped, in this epoch and the next ones."""

import pytest
import torch

from lightning_grass.app.data import InstructionDataModule, build_char_tokenizer


def loader(seed=0):
    dm = InstructionDataModule(task="arithmetic", tokenizer=build_char_tokenizer(), num_train=40, num_val=4, seed=seed)
    dm.batch_size = 8  # 5 batches per epoch
    dm.setup("fit")
    return dm.train_dataloader()


def rows(batch):
    """Each example's tokens without the padding, which depends on the batch it falls in."""
    return [
        tuple(row[mask.bool()].tolist()) for row, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)
    ]


def epochs(data_loader, count):
    return [rows(batch) for _ in range(count) for batch in data_loader]


def consume(data_loader, count):
    """The first ``count`` batches, across epochs, stopping in the middle of one like a killed run."""
    seen = []
    while len(seen) < count:
        for batch in data_loader:
            seen.append(rows(batch))
            if len(seen) == count:
                break
    return seen


@pytest.mark.parametrize("stop_after", [1, 3, 5, 7])
def test_a_loader_restored_from_its_state_continues_with_the_same_batches(stop_after):
    expected = epochs(loader(), 3)
    interrupted = loader()
    seen = consume(interrupted, stop_after)

    resumed = loader()
    resumed.load_state_dict(interrupted.state_dict())
    rest = epochs(resumed, 3)[: len(expected) - stop_after]
    assert seen + rest == expected


def test_the_shuffle_changes_every_epoch_and_follows_the_seed():
    first, second = epochs(loader(), 2)[:5], epochs(loader(), 2)[5:]
    assert sorted(row for batch in first for row in batch) == sorted(row for batch in second for row in batch)
    assert first != second
    assert epochs(loader(seed=1), 1) != first
    assert torch.equal(next(iter(loader()))["input_ids"], next(iter(loader()))["input_ids"])

"""Padding, packing, and the block-diagonal mask that keeps packed examples apart."""

import torch

from tether.data.collate import Example, block_causal_mask, pack_examples, packed_collate, pad_collate
from tether.engine.models import tiny_llama


def test_pad_collate_by_hand():
    batch = pad_collate([Example([5, 6, 7], [False, True, True]), Example([8], [False])], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch.attention_mask.tolist() == [[True, True, True], [True, False, False]]
    assert batch.loss_mask.tolist() == [[False, True, True], [False, False, False]]
    assert batch.num_loss_tokens == 2


def test_pack_first_fit_and_positions():
    """Lengths 3, 2, 4, 1 into rows of 5: [3, 2], [4, 1]; positions restart per example."""
    exs = [Example(list(range(1, n + 1)), [False] + [True] * (n - 1)) for n in (3, 2, 4, 1)]
    rows = pack_examples(exs, max_length=5)
    assert [[len(e.input_ids) for e in r] for r in rows] == [[3, 2], [4, 1]]
    batch = packed_collate(rows, pad_id=0)
    assert batch.segment_ids.tolist() == [[1, 1, 1, 2, 2], [1, 1, 1, 1, 2]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert batch.loss_mask.tolist() == [[False, True, True, False, True],
                                        [False, True, True, True, False]]


def test_block_causal_mask_by_hand():
    seg = torch.tensor([[1, 1, 2, 0]])
    mask = block_causal_mask(seg)[0, 0].int().tolist()
    assert mask == [[1, 0, 0, 0],
                    [1, 1, 0, 0],
                    [0, 0, 1, 0],
                    [0, 0, 0, 1]]  # the padding query sees only itself: no NaN from SDPA


def test_packed_rows_equal_separate_sequences_in_a_real_model():
    model = tiny_llama(vocab_size=50).eval()
    g = torch.Generator().manual_seed(0)
    exs = [Example(torch.randint(0, 50, (n,), generator=g).tolist(), [True] * n) for n in (4, 3, 5)]
    batch = packed_collate(pack_examples(exs, max_length=8), pad_id=0)  # rows [4, 3], [5]
    with torch.no_grad():
        packed = model.model(input_ids=batch.input_ids,
                             attention_mask=block_causal_mask(batch.segment_ids),
                             position_ids=batch.position_ids).last_hidden_state
        alone = [model.model(input_ids=torch.tensor([e.input_ids])).last_hidden_state[0]
                 for e in exs]
    torch.testing.assert_close(packed[0, :4], alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(packed[0, 4:7], alone[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(packed[1, :5], alone[2], atol=1e-5, rtol=0)
    assert torch.isfinite(packed).all()

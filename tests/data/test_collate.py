"""Padding, packing, and the block-diagonal mask that keeps packed examples apart."""

import pytest
import torch

from tether.data.collate import (Batch, Example, additive_mask, block_causal_mask, pack_examples,
                                 packed_collate, pad_collate)
from tether.engine.models import tiny_llama


def _ex(n, start=1):
    return Example(list(range(start, start + n)), [False] + [True] * (n - 1))


def test_pad_collate_by_hand():
    batch = pad_collate([Example([5, 6, 7], [False, True, True]), Example([8], [False])], pad_id=0)
    assert batch.input_ids.dtype == torch.long and batch.input_ids.shape == (2, 3)
    assert batch.input_ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch.attention_mask.dtype == torch.bool
    assert batch.attention_mask.tolist() == [[True, True, True], [True, False, False]]
    assert batch.loss_mask.dtype == torch.bool
    assert batch.loss_mask.tolist() == [[False, True, True], [False, False, False]]
    assert batch.position_ids is None and batch.segment_ids is None
    assert batch.num_loss_tokens == 2
    moved = batch.to("cpu")
    assert isinstance(moved, Batch) and torch.equal(moved.input_ids, batch.input_ids)
    assert moved.segment_ids is None
    with pytest.raises(ValueError, match="at least one example"):
        pad_collate([], pad_id=0)


def test_pack_first_fit_and_positions():
    """Lengths 3, 2, 4, 1 into rows of 5, first fit in order: [3, 2], [4, 1]."""
    exs = [_ex(n) for n in (3, 2, 4, 1)]
    rows = pack_examples(exs, max_length=5)
    assert [[len(e.input_ids) for e in r] for r in rows] == [[3, 2], [4, 1]]
    batch = packed_collate(rows, pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3, 1, 2], [1, 2, 3, 4, 1]]
    assert batch.segment_ids.tolist() == [[1, 1, 1, 2, 2], [1, 1, 1, 1, 2]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert batch.loss_mask.tolist() == [[False, True, True, False, True],
                                        [False, True, True, True, False]]
    assert batch.num_loss_tokens == 2 + 1 + 3 + 0


def test_pack_fills_earlier_rows_and_pads_with_segment_zero():
    """Lengths 4, 4, 1, 2 into rows of 5: [4, 1], [4], then 2 fits nowhere -> a new row."""
    rows = pack_examples([_ex(4), _ex(4, 10), _ex(1, 20), _ex(2, 30)], max_length=5)
    assert [[e.input_ids[0] for e in r] for r in rows] == [[1, 20], [10], [30]]
    assert rows == pack_examples([_ex(4), _ex(4, 10), _ex(1, 20), _ex(2, 30)], max_length=5)
    batch = packed_collate(rows, pad_id=-1)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 20], [10, 11, 12, 13, -1], [30, 31, -1, -1, -1]]
    assert batch.segment_ids.tolist() == [[1, 1, 1, 1, 2], [1, 1, 1, 1, 0], [1, 1, 0, 0, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 0], [0, 1, 2, 3, 0], [0, 1, 0, 0, 0]]
    assert batch.attention_mask.tolist() == (batch.segment_ids > 0).tolist()
    assert not batch.loss_mask[batch.segment_ids == 0].any()
    with pytest.raises(ValueError, match="6 tokens does not fit in a packed row of 5"):
        pack_examples([_ex(6)], max_length=5)


def test_block_causal_mask_by_hand():
    seg = torch.tensor([[1, 1, 2, 0]])
    mask = block_causal_mask(seg)
    assert mask.shape == (1, 1, 4, 4) and mask.dtype == torch.bool
    assert mask[0, 0].int().tolist() == [[1, 0, 0, 0],
                                         [1, 1, 0, 0],
                                         [0, 0, 1, 0],
                                         [0, 0, 0, 1]]  # a padding query sees only itself
    bias = additive_mask(mask)
    lowest = torch.finfo(torch.float32).min
    assert bias.dtype == torch.float32
    assert bias[0, 0, 1].tolist() == [0.0, 0.0, lowest, lowest]
    assert additive_mask(mask, torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_equal_separate_sequences_in_a_real_model(default_tokenizer, attn):
    """A packed row with the 4-D block-causal mask and restarting positions gives each example
    the hidden states it has alone; padding positions stay finite (no fully masked row)."""
    tok = default_tokenizer
    model = tiny_llama(vocab_size=len(tok)).eval()
    model.config._attn_implementation = attn
    texts = ["The quick brown fox.", "Hello there", "What is 2 + 2? Answer: 4", "ok"]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    exs = [Example(i, [False] + [True] * (len(i) - 1)) for i in ids]
    lengths = [len(e.input_ids) for e in exs]
    assert lengths == [5, 2, 12, 1]
    rows = pack_examples(exs, max_length=12)
    assert [len(r) for r in rows] == [3, 1]  # [fox, hello, ok] + 4 padding, [2 + 2]
    batch = packed_collate(rows, pad_id=tok.pad_token_id)
    assert (batch.segment_ids == 0).sum(dim=1).tolist() == [4, 0]
    mask = block_causal_mask(batch.segment_ids)
    if attn == "eager":  # eager attention adds the mask to the scores: it needs the float form
        mask = additive_mask(mask)
    with torch.no_grad():
        packed = model.model(input_ids=batch.input_ids, attention_mask=mask,
                             position_ids=batch.position_ids).last_hidden_state
        alone = {id(e): model.model(input_ids=torch.tensor([e.input_ids])).last_hidden_state[0]
                 for e in exs}
    for i, row in enumerate(rows):
        start = 0
        for e in row:
            n = len(e.input_ids)
            torch.testing.assert_close(packed[i, start:start + n], alone[id(e)], atol=1e-5, rtol=0)
            start += n
    assert torch.isfinite(packed).all()  # including the padding of row 1

"""experience.py's row plumbing for DAPO's dynamic sampling: samples of different prompt and
response widths joined row for row, and rows selected, without moving a token."""
import torch

import experience


def one(prompts, responses, pad=0):
    """Samples (steps 2-3) from lists of prompt and response token ids."""
    P, T = max(map(len, prompts)), max(map(len, responses))
    rows = len(prompts)
    seq = torch.full((rows, P + T), pad)
    attn = torch.zeros(rows, P + T, dtype=torch.long)
    mask = torch.zeros(rows, T)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        seq[i, P - len(p):P] = torch.tensor(p)
        seq[i, P:P + len(r)] = torch.tensor(r)
        attn[i, P - len(p):P + len(r)] = 1
        mask[i, :len(r)] = 1
    logprobs = -torch.arange(rows * T, dtype=torch.float32).view(rows, T) * mask
    records = [{"row": i, "finish_reason": "eos"} for i in range(rows)]
    return experience.Samples(seq, attn, mask, logprobs, torch.arange(rows, dtype=torch.float32),
                              records)


def real_tokens(exp, row):
    """(prompt tokens, response tokens, response log-probs) of one row, padding dropped."""
    P = exp.sequences.shape[1] - exp.mask.shape[1]
    prompt = exp.sequences[row, :P][exp.attention_mask[row, :P].bool()].tolist()
    n = int(exp.mask[row].sum())
    return prompt, exp.sequences[row, P:P + n].tolist(), exp.sampler_logprobs[row, :n].tolist()


def test_concat_then_select_keeps_every_row_as_it_was():
    a = one([[5, 6], [7]], [[1, 2, 3], [4]])
    b = one([[8, 9, 10, 11]], [[12, 13, 14, 15, 16]])
    joined = experience.concat_samples([a, b], pad_id=0)
    assert joined.sequences.shape == (3, 4 + 5) and joined.mask.shape == (3, 5)
    expected = [real_tokens(a, 0), real_tokens(a, 1), real_tokens(b, 0)]
    assert [real_tokens(joined, i) for i in range(3)] == expected
    assert joined.scores.tolist() == [0.0, 1.0, 0.0]
    assert (joined.mask.sum(1) == joined.attention_mask[:, 4:].sum(1)).all()
    picked = experience.select_rows(joined, [2, 0])
    assert [real_tokens(picked, i) for i in range(2)] == [expected[2], expected[0]]
    assert picked.scores.tolist() == [0.0, 0.0]
    assert picked.records == [b.records[0], a.records[0]]

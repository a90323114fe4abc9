import torch

from model.sampling import SamplingParams, SequenceSampler, filtered_probs, sample


def test_top_k_and_top_p_filter_each_row_by_its_own_params():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]]))
    probs = filtered_probs(logits, [SamplingParams(temperature=1, top_k=2), SamplingParams(temperature=1, top_p=0.7),
                                    SamplingParams(temperature=1)])
    assert torch.allclose(probs[0], torch.tensor([0.625, 0.375, 0, 0]))
    assert torch.allclose(probs[1], torch.tensor([0.625, 0.375, 0, 0]))  # 0.5 < 0.7, 0.8 >= 0.7: two kept
    assert torch.allclose(probs[2], torch.full((4,), 0.25))


def test_temperature_sharpens():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    hot = filtered_probs(logits, [SamplingParams(temperature=2.0)])[0]
    cold = filtered_probs(logits, [SamplingParams(temperature=0.5)])[0]
    assert cold[0] > hot[0]


def test_greedy_and_seeded_rows_in_one_batch():
    """Greedy rows take the argmax; each seeded row draws from its own generator, so two rows with
    the same seed and the same logits draw the same tokens step after step, whatever else shares
    the batch, and a row draws what it draws alone."""
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    logits[2] = logits[1]  # rows 1 and 2: same distribution, same seed
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1, seed=7), SamplingParams(temperature=1, seed=7),
              SamplingParams(temperature=1, seed=8)]

    def draws(rows: list[int], steps: int = 20) -> list[list[int]]:
        samplers = [SequenceSampler(params[r], [], torch.device("cpu")) for r in rows]
        out = [sample(logits[rows], samplers)[0] for _ in range(steps)]
        return [list(col) for col in zip(*out)]  # per row: its tokens over the steps

    batch = draws([0, 1, 2, 3])
    assert batch == draws([0, 1, 2, 3])  # reproducible
    assert batch[0] == [int(logits[0].argmax())] * 20
    assert batch[1] == batch[2]  # same seed, same logits: same draws, though they share one batch
    assert batch[1] == draws([1])[0] and batch[3] == draws([3])[0]  # as alone
    assert batch[1] != batch[3]  # another seed draws another sequence (20 draws from 50 tokens)
    assert len(set(batch[1])) > 1  # and really samples (not the argmax every time)


def test_penalties_discourage_repeats():
    logits = torch.tensor([[3.0, 2.9, 0.0]])
    s = SequenceSampler(SamplingParams(temperature=0, frequency_penalty=1.0), [], torch.device("cpu"))
    first, _ = sample(logits, [s])
    second, _ = sample(logits, [s])
    assert first == [0] and second == [1]
    r = SequenceSampler(SamplingParams(temperature=0, repetition_penalty=2.0), [0], torch.device("cpu"))
    assert sample(logits, [r])[0] == [1]  # the prompt's token 0 is penalised: 3.0 / 2 < 2.9

"""The fused probe+EMA Triton kernel (interpreted on CPU) against its PyTorch reference."""

import pytest
import torch

from oc_engine.kernels.probe_ema import probe_ema, probe_ema_reference, probe_ema_triton

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _inputs(layers, batch, hidden_size, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(layers, hidden_size, generator=g) / hidden_size ** 0.5
    bias = torch.randn(1, generator=g)
    steps = [torch.randn(layers, batch, hidden_size, generator=g).to(dtype) for _ in range(6)]
    return weight, bias, steps


def _compare(layers, batch, hidden_size, dtype):
    weight, bias, steps = _inputs(layers, batch, hidden_size, dtype)
    thresholds = torch.tensor([0.3, 0.4, 0.6])
    ema_kernel = torch.full((batch,), -1.0)
    ema_ref = ema_kernel.clone()
    for hidden in steps:  # EMA state carried over many steps
        score_k, flags_k = probe_ema_triton(hidden, weight, bias, ema_kernel, thresholds)
        score_r, flags_r = probe_ema_reference(hidden, weight, bias, ema_ref, thresholds)
        torch.testing.assert_close(score_k, score_r, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ema_kernel, ema_ref, atol=1e-5, rtol=1e-5)
        # Flags must agree except where the EMA sits within rounding of a threshold.
        clear = ((ema_ref - 0.4).abs() > 1e-4) & ((ema_ref - 0.6).abs() > 1e-4)
        assert torch.equal(flags_k[clear], flags_r[clear])
    assert (ema_ref >= 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden_size", [64, 576, 1000, 2304, 4096])
@pytest.mark.parametrize("batch", [1, 3, 16])
def test_kernel_matches_reference(batch, hidden_size, dtype):
    _compare(1, batch, hidden_size, dtype)


@pytest.mark.parametrize("layers", [2, 3])
def test_several_tapped_layers_sum_their_logits(layers):
    _compare(layers, 5, 1000, torch.bfloat16)


def test_first_score_starts_the_ema_and_flags_follow_thresholds():
    hidden = torch.ones(1, 2, 4)
    weight = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    ema = torch.tensor([-1.0, 0.0])
    score, flags = probe_ema_reference(hidden, weight, torch.tensor([0.0]), ema, torch.tensor([0.5, 0.5, 0.9]))
    expected_score = torch.sigmoid(torch.tensor(4.0))
    torch.testing.assert_close(score, expected_score.repeat(2))
    torch.testing.assert_close(ema, torch.stack([expected_score, 0.5 * expected_score]))
    assert flags.tolist() == [3, 0]  # 0.98 >= warn and pause; 0.49 below both


def test_noncontiguous_rows_are_read_correctly():
    weight, bias, steps = _inputs(1, 4, 100, torch.float32)
    wide = torch.randn(1, 4, 300)
    wide[..., 100:200] = steps[0]
    view = wide[..., 100:200]  # rows with a stride of 300
    a, b = torch.full((4,), -1.0), torch.full((4,), -1.0)
    th = torch.tensor([0.5, 0.5, 0.5])
    torch.testing.assert_close(probe_ema_triton(view, weight, bias, a, th)[0],
                               probe_ema_reference(steps[0], weight, bias, b, th)[0])


def test_custom_op_compiles_without_graph_breaks():
    weight, bias, steps = _inputs(1, 3, 64, torch.float32)
    thresholds = torch.tensor([0.5, 0.4, 0.6])

    def step(x, ema):
        hidden = torch.tanh(x)[None]  # stands in for the model's tapped layer
        return probe_ema(hidden, weight, bias, ema, thresholds)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    ema_c, ema_e = torch.full((3,), -1.0), torch.full((3,), -1.0)
    for x in steps:
        score_c, flags_c = compiled(x[0], ema_c)
        score_e, flags_e = step(x[0], ema_e)
        torch.testing.assert_close(score_c, score_e)
        torch.testing.assert_close(ema_c, ema_e)  # the in-place EMA update survives compilation
    explanation = torch._dynamo.explain(step)(steps[0][0], torch.full((3,), -1.0))
    assert explanation.graph_break_count == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_finite_inputs_flag_every_bit_and_keep_the_ema(dtype):
    """NaN or inf in the hidden states (or an overflowing probe) scores NaN, sets flags 7
    (warn, pause, non-finite) and leaves the EMA as it was; a NaN EMA stays flagged. The
    kernel and the reference agree."""
    nan, inf = float("nan"), float("inf")
    hidden = torch.tensor([[[1.0, nan, 0.0, 0.0], [-0.1, -0.1, -0.1, -0.1], [inf, 0.0, 0.0, 0.0],
                            [-inf, 0.0, 0.0, 0.0], [inf, -inf, 0.0, 0.0], [-0.1, -0.1, -0.1, -0.1]]]).to(dtype)
    weight, bias = torch.ones(1, 4), torch.zeros(1)
    thresholds = torch.tensor([0.5, 0.5, 0.8])
    start = torch.tensor([0.1, -1.0, 0.2, 0.3, -1.0, nan])
    results = []
    for fn in (probe_ema_triton, probe_ema_reference):
        ema = start.clone()
        score, flags = fn(hidden, weight, bias, ema, thresholds)
        results.append((score, flags, ema))
        assert flags.tolist() == [7, 0, 7, 7, 7, 7]
        assert torch.isnan(score[[0, 2, 3, 4]]).all() and torch.isfinite(score[[1, 5]]).all()
        torch.testing.assert_close(ema[:5], torch.tensor([0.1, float(score[1]), 0.2, 0.3, -1.0]))
        assert torch.isnan(ema[5])
    torch.testing.assert_close(results[0][0], results[1][0], equal_nan=True)

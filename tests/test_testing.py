"""discrnn.testing: the public references and assertion helpers."""

import pytest
import torch

import discrnn.testing as dt
from discrnn import DiscreteGRU, DiscreteLSTM


def test_docstring_example_and_codes_assertion():
    x = torch.randn(1000).tanh()
    codes = dt.torch_encode(x, 64, "tanh")
    packed = dt.poison_(torch.empty(750, dtype=torch.uint8))
    assert int(packed[0]) == dt.CODE_POISON
    packed.copy_(dt.torch_pack(codes, 6))  # stands for a user's kernel
    dt.assert_codes_equal(packed, dt.torch_pack(codes, 6), name="packed")
    packed[[3, 700]] ^= 1
    with pytest.raises(AssertionError, match=r"packed: 2 of 750 elements differ: \[3\]"):
        dt.assert_codes_equal(packed, dt.torch_pack(codes, 6), name="packed")
    with pytest.raises(AssertionError, match="expected"):
        dt.assert_codes_equal(packed[:10], dt.torch_pack(codes, 6), name="packed")
    assert torch.equal(dt.torch_unpack(dt.torch_pack(codes, 6), 6, 1000), codes)


def test_assert_close_report_names_the_pair_and_the_worst():
    a = torch.zeros(4)
    dt.assert_close_report(["x", "none"], [a, None], [a.clone(), None], rtol=0, atol=0)
    b = a.clone()
    b[2] = 0.5
    with pytest.raises(AssertionError, match=r"y: worst \|diff\| \['0.5'.*at flat positions \[2"):
        dt.assert_close_report(["x", "y"], [a, a], [a, b], rtol=0, atol=1e-3)
    with pytest.raises(AssertionError, match="one side is None"):
        dt.assert_close_report(["x"], [a], [None], rtol=0, atol=0)
    assert "inf" in dt.worst_differences(torch.tensor([float("nan")]), torch.zeros(1))


def test_poison():
    assert torch.isnan(dt.poison_(torch.zeros(3))).all()
    assert (dt.poison_(torch.zeros(3, dtype=torch.int32)) == -7).all()
    assert not dt.poison_(torch.zeros(3, dtype=torch.bool)).any()


@pytest.mark.parametrize("cls, kwargs", [(DiscreteLSTM, {"proj_size": 3}), (DiscreteLSTM, {}),
                                         (DiscreteGRU, {})])
def test_reference_stack_is_the_module(cls, kwargs):
    torch.manual_seed(0)
    m = cls(4, 5, num_layers=2, bidirectional=True, levels=16, **kwargs).double()
    x = torch.randn(7, 3, 4, dtype=torch.float64)
    y, hx = m(x)
    y_ref, hx_ref = dt.reference_stack(m, x)
    outs = [y, *(hx if isinstance(hx, tuple) else (hx,))]
    refs = [y_ref, *(hx_ref if isinstance(hx_ref, tuple) else (hx_ref,))]
    dt.assert_close_report(["y", "h_n", "c_n"][: len(outs)], outs, refs, rtol=1e-10, atol=1e-10)


def test_kept_bytes_of_a_layer():
    T, B, H = 64, 4, 32
    m = DiscreteLSTM(8, H, levels=64)
    x = torch.randn(T, B, 8, requires_grad=True)
    kept, (y, _) = dt.kept_bytes(lambda: m(x), exclude=[x, *m.parameters()])
    assert y.shape == (T, B, H)
    assert 3.0 <= kept / (T * B * H) <= 4.25  # 5 six-bit codes per unit, plus checkpoints

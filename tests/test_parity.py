"""rnnfused against torch.nn with identical weights: outputs, final states and every gradient
(input, initial states, each parameter), over the grid of layer configurations and input forms."""
import itertools

import pytest
import torch

from helpers import LAYER_MODES, assert_twins_agree, forward_backward, sequence_inputs, twin_cells, twin_layers

STEPS, BATCH, INPUT, HIDDEN, PROJ = 5, 3, 4, 6, 3
FORMS = ["padded", "unbatched", "packed_sorted", "packed_unsorted"]


def _grid():
    for mode in LAYER_MODES:
        projections = (0, PROJ) if mode == "lstm" else (0,)
        for layers, bidirectional, batch_first, bias, proj, form, with_hx in itertools.product(
            (1, 2, 3), (False, True), (False, True), (True, False), projections, FORMS, (False, True)
        ):
            name = (
                f"{mode}-L{layers}-{'bi' if bidirectional else 'uni'}-{'bf' if batch_first else 'sf'}"
                f"-{'bias' if bias else 'nobias'}-P{proj}-{form}-{'hx' if with_hx else 'nohx'}"
            )
            yield pytest.param(mode, layers, bidirectional, batch_first, bias, proj, form, with_hx, id=name)


def state_shapes(mode, layers, bidirectional, batch, proj):
    directions = 2 if bidirectional else 1
    h_shape = (layers * directions, batch, proj or HIDDEN)
    if mode == "lstm":
        return [h_shape, (layers * directions, batch, HIDDEN)]
    return [h_shape]


@pytest.mark.parametrize("mode,layers,bidirectional,batch_first,bias,proj,form,with_hx", list(_grid()))
def test_layer_parity_float64(mode, layers, bidirectional, batch_first, bias, proj, form, with_hx):
    kwargs = dict(num_layers=layers, bidirectional=bidirectional, batch_first=batch_first, bias=bias)
    if proj:
        kwargs["proj_size"] = proj
    ref, ours = twin_layers(mode, INPUT, HIDDEN, **kwargs)
    shapes = state_shapes(mode, layers, bidirectional, BATCH, proj) if with_hx else None
    make = sequence_inputs(form, STEPS, BATCH, INPUT, shapes, torch.float64, batch_first=batch_first)
    assert_twins_agree(ref, ours, make)


@pytest.mark.parametrize("mode", list(LAYER_MODES))
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_layer_parity_float32(mode, form, bidirectional):
    """float32 agrees with torch.nn to rtol 2e-4, atol 2e-5 (T=12, two layers)."""
    kwargs = dict(num_layers=2, bidirectional=bidirectional)
    if mode == "lstm":
        kwargs["proj_size"] = PROJ
    ref, ours = twin_layers(mode, 8, 16, dtype=torch.float32, **kwargs)
    proj = PROJ if mode == "lstm" else 0
    directions = 2 if bidirectional else 1
    shapes = [(2 * directions, 5, proj or 16)] + ([(2 * directions, 5, 16)] if mode == "lstm" else [])
    make = sequence_inputs(form, 12, 5, 8, shapes, torch.float32)
    assert_twins_agree(ref, ours, make, dtype=torch.float32)


@pytest.mark.parametrize("mode", list(LAYER_MODES))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("with_hx", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cell_parity(mode, bias, batched, with_hx, dtype):
    ref, ours = twin_cells(mode, INPUT, HIDDEN, dtype=dtype, bias=bias)

    def make():
        generator = torch.Generator().manual_seed(3)

        def leaf(*shape):
            shape = shape if batched else shape[1:]
            return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype).requires_grad_()

        x = leaf(BATCH, INPUT)
        if not with_hx:
            return [x], (x,)
        if mode == "lstm":
            h, c = leaf(BATCH, HIDDEN), leaf(BATCH, HIDDEN)
            return [x, h, c], (x, (h, c))
        h = leaf(BATCH, HIDDEN)
        return [x, h], (x, h)

    assert_twins_agree(ref, ours, make, dtype=dtype)


@pytest.mark.parametrize("mode", list(LAYER_MODES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_error_against_float64(mode, dtype):
    """bfloat16 / float16 judged against a float64 reference: rnnfused's error (outputs, states,
    gradients) is no worse than twice torch.nn's own error in the same dtype.

    The seed is one whose ReLU pre-activations keep clear of zero: where one lies within rounding
    of the kink, either side's low-precision mask may flip and both errors become O(1), which
    says nothing about either implementation."""
    kwargs = dict(num_layers=2, bidirectional=True)
    ref64, ours = twin_layers(mode, 8, 16, dtype=torch.float64, seed=1, **kwargs)
    ref_low, _ = twin_layers(mode, 8, 16, dtype=torch.float64, seed=1, **kwargs)
    ref_low.to(dtype)
    ours.to(dtype)
    shapes = [(4, 5, 16)] * (2 if mode == "lstm" else 1)
    make64 = sequence_inputs("padded", 20, 5, 8, shapes, torch.float64)
    make_low = sequence_inputs("padded", 20, 5, 8, shapes, dtype)

    exact_out, exact_grads = forward_backward(ref64, make64)
    for label, exact, ref_vals, our_vals in (
        ("outputs", exact_out, *[forward_backward(m, make_low)[0] for m in (ref_low, ours)]),
        ("gradients", exact_grads, *[forward_backward(m, make_low)[1] for m in (ref_low, ours)]),
    ):
        for index, (e, r, o) in enumerate(zip(exact, ref_vals, our_vals)):
            assert o.dtype == dtype, f"{label}[{index}] has dtype {o.dtype}"
            ref_error = (r.double() - e).abs().max().item()
            our_error = (o.double() - e).abs().max().item()
            scale = e.abs().max().item()
            assert our_error <= 2 * ref_error + 1e-3 * scale, (
                f"{label}[{index}]: rnnfused error {our_error:.3g} vs torch.nn {ref_error:.3g} ({dtype})"
            )

"""Expert routing: one stable sort per forward, each expert on a contiguous slice, the same outputs as the previous
gather/scatter routing, no device sync, and a permutation that follows the rows to another device."""

import pytest
import torch
from conftest import OBJ_PAD, shape_span

import cgmllm.modeling_cgmllm as modeling
from cgmllm.modeling_cgmllm import ExpertRouting


class IndexCopyRouting:
    """The routing before the sort (kept here as the reference): gather each expert's rows with `index_select`,
    write them back with `index_copy`, the row count read with a host sync."""

    def __init__(self, block_ar_mask, num_block_ar=None):
        flat = block_ar_mask.reshape(-1)
        self.num_block_ar = int(flat.sum())
        self.num_rows = flat.numel()
        if 0 < self.num_block_ar < self.num_rows:
            self.block_ar_index = flat.nonzero().squeeze(-1)
            self.token_ar_index = (~flat).nonzero().squeeze(-1)

    def __call__(self, hidden_states, token_ar_fn, block_ar_fn):
        if self.num_block_ar == 0:
            return token_ar_fn(hidden_states)
        if self.num_block_ar == self.num_rows:
            return block_ar_fn(hidden_states)
        leading_shape = hidden_states.shape[:-1]
        flat = hidden_states.reshape(self.num_rows, hidden_states.shape[-1])
        token_rows = token_ar_fn(flat.index_select(0, self.token_ar_index))
        block_rows = block_ar_fn(flat.index_select(0, self.block_ar_index))
        out = token_rows.new_zeros(self.num_rows, *token_rows.shape[1:])
        out = out.index_copy(0, self.token_ar_index, token_rows).index_copy(0, self.block_ar_index, block_rows)
        return out.reshape(*leading_shape, *token_rows.shape[1:])


def test_each_expert_sees_one_contiguous_slice_in_sequence_order():
    mask = torch.tensor([[False, True, True, False], [True, False, False, True]])
    routing = ExpertRouting(mask, num_block_ar=4)
    x = torch.arange(8.0).view(2, 4, 1)
    seen = {}

    def expert(name, offset):
        def run(rows):
            seen[name] = rows.flatten().tolist()
            assert rows.is_contiguous()
            return rows + offset
        return run

    out = routing(x, expert("token", 100.0), expert("block", 1000.0))
    assert seen == {"token": [0.0, 3.0, 5.0, 6.0], "block": [1.0, 2.0, 4.0, 7.0]}
    expected = torch.where(mask[..., None], x + 1000.0, x + 100.0)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    # One kind of row: the whole tensor goes to one expert, untouched.
    only_text = ExpertRouting(torch.zeros(2, 4, dtype=torch.bool), 0)
    assert only_text(x, lambda r: r * 2, None).equal(x * 2)


def test_the_permutation_follows_the_rows_to_their_device():
    # A `device_map` can put layers on other devices; the meta device stands in for a second one here.
    mask = torch.tensor([[False, True, False]])
    routing = ExpertRouting(mask, num_block_ar=1)
    rows = torch.empty(1, 3, 5, device="meta")
    out = routing(rows, lambda r: r[..., :2], lambda r: r[..., :2] * 2)
    assert out.device.type == "meta" and out.shape == (1, 3, 2)
    assert set(routing._permutations) == {torch.device("cpu"), torch.device("meta")}


@pytest.mark.parametrize("train", [False, True])
def test_outputs_equal_the_index_copy_routing(tiny_model, monkeypatch, train):
    # A mixed batch: text, a noisy block, text with labels, and a second row with a clean block (3D understanding).
    input_ids = torch.tensor([[11, 12] + shape_span(6) + [13, 14, 15], [21] + shape_span(6) + [22, 23, 24, 25]])
    labels = input_ids.masked_fill(input_ids == OBJ_PAD, -100)
    latents = torch.randn(12, 8, generator=torch.Generator().manual_seed(0))
    timesteps = torch.cat([torch.full((6,), 0.7), torch.zeros(6)])
    tiny_model.train(train)

    def run():
        tiny_model.zero_grad()
        out = tiny_model(input_ids=input_ids, labels=labels, shape_latents=latents, shape_timesteps=timesteps)
        (out.loss + out.velocity.square().mean()).backward()
        grads = {n: p.grad.clone() for n, p in tiny_model.named_parameters() if p.grad is not None}
        return out, grads

    sorted_out, sorted_grads = run()
    monkeypatch.setattr(modeling, "ExpertRouting", IndexCopyRouting)
    reference, reference_grads = run()
    torch.testing.assert_close(sorted_out.logits, reference.logits, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sorted_out.velocity, reference.velocity, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sorted_out.loss, reference.loss, rtol=1e-6, atol=1e-6)
    assert sorted_grads.keys() == reference_grads.keys()
    for name, grad in sorted_grads.items():
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_routing_makes_no_host_sync(tiny_model):
    # `torch.cuda.set_sync_debug_mode` needs a GPU; on CPU the routing code itself is checked: building the plan and
    # applying it never turns a tensor into a Python number or bool.
    mask = torch.tensor([[False, True, True, False]])
    calls = []
    original_int, original_bool = torch.Tensor.__int__, torch.Tensor.__bool__
    try:
        torch.Tensor.__int__ = lambda self: calls.append("int") or original_int(self)
        torch.Tensor.__bool__ = lambda self: calls.append("bool") or original_bool(self)
        routing = ExpertRouting(mask, num_block_ar=2)
        routing(torch.randn(1, 4, 3), lambda r: r + 1, lambda r: r - 1)
    finally:
        torch.Tensor.__int__, torch.Tensor.__bool__ = original_int, original_bool
    assert calls == []

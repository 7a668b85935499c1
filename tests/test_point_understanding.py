"""The official 3D-understanding input: `point_features` through `obj_und_connector` as a clean BlockAR block."""

import pytest
import torch
from conftest import OBJ_END, OBJ_PAD, OBJ_START, randomize_heads, shape_span, tiny_cgmllm_config

from cgmllm import CGMLLMForConditionalGeneration


HIDDEN, POINT_DIM, ROWS = 32, 12, 5
QUESTION = [1, 7, 8, 9, 2, 1]  # <|im_start|> q q q <|im_end|> <|im_start|> (ids of the tiny vocabulary)


def _model(seed=0, **overrides):
    torch.manual_seed(seed)
    config = tiny_cgmllm_config(point_feature_dim=POINT_DIM, **overrides)
    return randomize_heads(CGMLLMForConditionalGeneration(config).eval(), seed)


def _input_ids():
    return torch.tensor([shape_span(ROWS) + QUESTION])


def test_connector_keys_and_absence_by_default():
    model = _model()
    names = {k for k in model.state_dict() if "obj_und_connector" in k}
    assert names == {f"model.obj_und_connector.{n}.{p}" for n in ("fc1", "fc2") for p in ("weight", "bias")}
    assert tuple(model.model.obj_und_connector.fc1.weight.shape) == (HIDDEN, POINT_DIM)
    plain = CGMLLMForConditionalGeneration(tiny_cgmllm_config())
    assert not any("obj_und_connector" in k for k in plain.state_dict())


@torch.no_grad()
def test_point_path_equals_a_clean_block_fed_the_connector_output():
    """Direct computation: rows = fc2(gelu_tanh(fc1(features))), no timestep embedding, then exactly the clean-block
    path. A copy of the model whose `obj2llm` is the identity and whose timestep embedding is zero, fed those rows
    as clean latents (t = 0), must give the same logits."""
    model = _model(shape_latent_channels=HIDDEN)
    features = torch.randn(ROWS, POINT_DIM, generator=torch.Generator().manual_seed(1))
    connector = model.model.obj_und_connector
    hidden = features @ connector.fc1.weight.T + connector.fc1.bias
    hidden = 0.5 * hidden * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (hidden + 0.044715 * hidden**3)))
    rows = hidden @ connector.fc2.weight.T + connector.fc2.bias

    out = model(input_ids=_input_ids(), point_features=features)
    assert out.velocity is None  # understanding rows are context: no velocity

    reference = _model(shape_latent_channels=HIDDEN)
    reference.model.obj2llm.weight.copy_(torch.eye(HIDDEN))
    reference.model.obj2llm.bias.zero_()
    reference.model.time_embedder.mlp[2].weight.zero_()
    reference.model.time_embedder.mlp[2].bias.zero_()
    expected = reference(input_ids=_input_ids(), shape_latents=rows, shape_timesteps=torch.zeros(ROWS))
    torch.testing.assert_close(out.logits, expected.logits, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_one_rope_id_for_the_block_and_bidirectional_rows():
    model = _model()
    features = torch.randn(ROWS, POINT_DIM, generator=torch.Generator().manual_seed(2))
    out = model(input_ids=_input_ids(), point_features=features, output_hidden_states=True)
    # All ROWS + 2 block tokens (markers included) at rope id 0; the question continues at 1.
    assert out.position_ids[:, 0, : ROWS + 2].unique().tolist() == [0]
    assert out.position_ids[0, 0, ROWS + 2 :].tolist() == list(range(1, len(QUESTION) + 1))
    # Bidirectional inside the block: the first row sees the last one.
    changed = features.clone()
    changed[-1] += 1.0
    again = model(input_ids=_input_ids(), point_features=changed, output_hidden_states=True)
    first_row = 1
    assert not torch.allclose(out.hidden_states[-1][0, first_row], again.hidden_states[-1][0, first_row])
    # ... and the question (after the block) sees the block.
    assert not torch.allclose(out.logits[0, -1], again.logits[0, -1])


@torch.no_grad()
def test_generate_with_point_features_continues_after_the_block():
    model = _model()
    features = torch.randn(1, ROWS, POINT_DIM, generator=torch.Generator().manual_seed(3))
    ids = _input_ids()
    generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), point_features=features,
                               max_new_tokens=3, do_sample=False, pad_token_id=0)
    # Greedy token by token without a cache gives the same continuation.
    tokens = ids
    for _ in range(3):
        logits = model(input_ids=tokens, point_features=features).logits[:, -1]
        tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    assert generated.tolist() == tokens.tolist()


def test_point_feature_errors_are_clear():
    model = _model()
    with pytest.raises(ValueError, match=r"\(num_rows, 12\)"):
        model(input_ids=_input_ids(), point_features=torch.zeros(ROWS, 7))
    with pytest.raises(ValueError, match="<\\|obj_pad\\|>` tokens \\(5\\).*\\(4\\)"):
        model(input_ids=_input_ids(), point_features=torch.zeros(4, POINT_DIM))
    with pytest.raises(ValueError, match="not both"):
        model(input_ids=_input_ids(), point_features=torch.zeros(ROWS, POINT_DIM), shape_latents=torch.zeros(ROWS, 8))
    plain = CGMLLMForConditionalGeneration(tiny_cgmllm_config()).eval()
    with pytest.raises(ValueError, match="no `obj_und_connector`"):
        plain(input_ids=_input_ids(), point_features=torch.zeros(ROWS, POINT_DIM))
    with pytest.raises(ValueError, match="point_feature_dim"):
        tiny_cgmllm_config(point_feature_dim=0)


def test_markers_are_the_block_edges():
    assert _input_ids()[0, 0] == OBJ_START and _input_ids()[0, ROWS + 1] == OBJ_END
    assert int((_input_ids() == OBJ_PAD).sum()) == ROWS


@torch.no_grad()
def test_beam_search_keeps_each_prompt_with_its_own_point_features():
    model = _model()
    features = torch.randn(2, ROWS, POINT_DIM, generator=torch.Generator().manual_seed(4))
    ids = _input_ids().repeat(2, 1)
    kwargs = dict(max_new_tokens=3, do_sample=False, num_beams=2, pad_token_id=0)
    both = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), point_features=features, **kwargs)
    for b in range(2):
        alone = model.generate(input_ids=ids[:1], attention_mask=torch.ones_like(ids[:1]),
                               point_features=features[b], **kwargs)
        assert both[b].tolist() == alone[0].tolist()

import itertools

import pytest
import torch

from captioner.models.show_tell import CELLS, INJECT_MODES, ShowTell
from captioner.data.vocab import BOS_ID, EOS_ID, PAD_ID
from conftest import cross_entropy_loss

V, D = 23, 10


def _batch(batch=4, length=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, D, generator=g)
    tokens = torch.randint(4, V, (batch, length), generator=g)
    tokens[:, 0] = BOS_ID
    tokens[0, -1] = EOS_ID
    if batch > 1:  # a shorter caption
        tokens[1, 4:] = PAD_ID
        tokens[1, 3] = EOS_ID
    return features, tokens


@pytest.mark.parametrize("inject,cell", list(itertools.product(INJECT_MODES, CELLS)))
def test_shapes_and_gradients_for_every_option(inject, cell):
    torch.manual_seed(0)
    model = ShowTell(V, D, embed_dim=8, hidden_dim=12, num_layers=2, dropout=0.1, cell=cell, inject=inject)
    features, tokens = _batch()
    assert model(features, tokens).shape == (4, 6, V)
    loss, n_tokens = cross_entropy_loss(model, features, tokens)
    assert n_tokens == int((tokens[:, 1:] != PAD_ID).sum())
    loss.backward()
    for name, p in model.named_parameters():
        if name == "embed.weight":  # only rows of tokens that appear get a gradient
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    logprobs, state = model.next_logprobs(torch.full((4,), BOS_ID), model.init_state(features))
    assert logprobs.shape == (4, V)
    assert torch.allclose(logprobs.exp().sum(-1), torch.ones(4), atol=1e-5)


@pytest.mark.parametrize("inject", INJECT_MODES)
def test_step_by_step_equals_teacher_forcing(inject):
    torch.manual_seed(1)
    model = ShowTell(V, D, embed_dim=8, hidden_dim=12, cell="lstm", inject=inject).eval()
    features, tokens = _batch(batch=2, length=5)
    tokens[1] = tokens[0]
    full = torch.log_softmax(model(features, tokens), dim=-1)
    state = model.init_state(features)
    for t in range(tokens.size(1) - 1):
        logprobs, state = model.next_logprobs(tokens[:, t], state)
        assert torch.allclose(logprobs, full[:, t], atol=1e-5)


def test_loss_ignores_padding():
    torch.manual_seed(2)
    model = ShowTell(V, D, embed_dim=8, hidden_dim=12, dropout=0.0).eval()
    features, tokens = _batch(batch=1, length=5)
    padded = torch.cat([tokens, torch.full((1, 4), PAD_ID)], dim=1)
    assert torch.allclose(cross_entropy_loss(model, features, tokens)[0], cross_entropy_loss(model, features, padded)[0])


def test_first_step_bias_only_touches_first_step():
    torch.manual_seed(3)
    model = ShowTell(V, D, embed_dim=8, hidden_dim=12, inject="first_step_bias", dropout=0.0).eval()
    state = model.init_state(torch.randn(1, D))
    # the image enters through the first word step only: a zero feature changes the output
    zero_state = model.init_state(torch.zeros(1, D))
    bos = torch.tensor([BOS_ID])
    assert not torch.allclose(model.next_logprobs(bos, state)[0], model.next_logprobs(bos, zero_state)[0])


def test_overfits_one_batch():
    torch.manual_seed(0)
    model = ShowTell(V, D, embed_dim=32, hidden_dim=64, dropout=0.0)
    features, tokens = _batch(batch=8, length=9, seed=5)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss, _ = cross_entropy_loss(model, features, tokens)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05


def test_tied_embeddings_share_one_matrix_and_need_equal_sizes():
    model = ShowTell(V, D, embed_dim=16, hidden_dim=16, tie_embeddings=True)
    assert model.output.weight is model.embed.weight
    untied = ShowTell(V, D, embed_dim=16, hidden_dim=16)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in untied.parameters()) - V * 16
    restored = ShowTell(V, D, embed_dim=16, hidden_dim=16, tie_embeddings=True)
    restored.load_state_dict(model.state_dict())
    assert restored.output.weight is restored.embed.weight
    from conftest import compose_config

    from captioner.config import validate

    with pytest.raises(ValueError, match=r"model.tie_embeddings=true needs model.embed_dim == model.hidden_dim"):
        validate(compose_config("train", ["model.embed_dim=8", "model.hidden_dim=16", "model.tie_embeddings=true"]))


def test_label_smoothing_is_the_cross_entropy_objectives_option():
    from captioner.data.batches import Batch
    from captioner.objectives.cross_entropy import CrossEntropy

    torch.manual_seed(4)
    model = ShowTell(V, D, embed_dim=8, hidden_dim=12, dropout=0.0)
    features, tokens = _batch()
    batch = Batch(features, tokens, torch.arange(len(features)))
    plain, smooth = CrossEntropy()(model, batch), CrossEntropy(label_smoothing=0.1)(model, batch)
    assert plain.weight == smooth.weight == int((tokens[:, 1:] != 0).sum())
    assert torch.allclose(plain.loss, cross_entropy_loss(model, features, tokens)[0])
    # smoothing adds eps * (mean over words of -log p - the target's -log p) to the plain loss
    logits = model(features, tokens)[tokens[:, 1:] != 0]
    uniform = -logits.log_softmax(-1).mean(-1).mean()
    assert torch.allclose(smooth.loss, 0.9 * plain.loss + 0.1 * uniform, atol=1e-6)

import pytest
import torch
from torch import nn

from captioner.training.ema import WeightAverage


def test_average_follows_the_weights_with_warmed_up_decay():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    average = WeightAverage(model, decay=0.9)
    start = model.weight.detach().clone()
    expected = start.clone()
    for n in range(1, 40):
        with torch.no_grad():
            model.weight.add_(1.0)
        average.update(model)
        keep = min(0.9, (1 + n) / (10 + n))
        expected = keep * expected + (1 - keep) * model.weight.detach()
    assert torch.allclose(average.model.weight, expected, atol=1e-5)
    assert not average.model.weight.requires_grad and not average.model.training
    assert torch.equal(start + 39, model.weight.detach())  # the trained model is untouched


def test_decay_outside_zero_one_is_refused():
    with pytest.raises(ValueError, match="optim.ema_decay"):
        WeightAverage(nn.Linear(2, 2), decay=1.0)

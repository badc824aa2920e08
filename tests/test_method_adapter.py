"""Bottleneck adapters: 2dr + r + d per adapter, placements, identity at init."""

import pytest

from conftest import ARCHS, n_trainable
from peftlab import load_model, prepare
from peftlab.errors import UserError


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("spec, places, r", [("adapter:r=8", 2, 8), ("adapter:r=8,placement=pfeiffer", 1, 8),
                                             ("adapter:reduction=16", 2, 4), ("adapter:r=5,layers=1", 2, 5)])
def test_counts(arch, spec, places, r):
    model = load_model(arch).model
    prepare(model, spec)
    d = model.config.hidden_size
    layers = 1 if "layers=1" in spec else model.config.num_hidden_layers
    assert n_trainable(model) == layers * places * (2 * d * r + r + d)


@pytest.mark.parametrize("spec, says", [("adapter:r=0", "r=0 is out of range"),
                                        ("adapter:placement=middle", "choose one of: houlsby, pfeiffer"),
                                        ("adapter:activation=swish", "choose one of")])
def test_errors(spec, says):
    with pytest.raises(UserError, match=says):
        prepare(load_model("tiny-llama").model, spec)

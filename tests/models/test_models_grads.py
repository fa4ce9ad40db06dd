"""Where each stage's loss sends its gradient: joint training, `detach_input`, and switched-off losses."""
from __future__ import annotations

import pytest
import torch

from models import NStageVAE, nstage_loss

N = 3


def _grad_state(module: torch.nn.Module) -> str:
    """'none' if no parameter got a gradient, 'zero' if all are exactly zero, else 'nonzero'."""
    grads = [p.grad for p in module.parameters()]
    if all(g is None for g in grads):
        return "none"
    if all(g is None or torch.count_nonzero(g) == 0 for g in grads):
        return "zero"
    return "nonzero"


def _backward_one_term(make_config, images, stage: int, detach=()):
    torch.manual_seed(0)
    cfg = make_config(n_stages=N, detach=detach)
    model = NStageVAE(cfg)
    x = images(2, 1, 28)
    _, terms = nstage_loss(model(x), x, cfg)
    terms[f"rec_{stage}"].backward()
    return model


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_every_stage_loss_reaches_the_encoder(make_config, images, stage):
    """Joint training (the paper): stage i's loss reaches the encoder and stages 1..i, and nothing after i."""
    model = _backward_one_term(make_config, images, stage)
    assert _grad_state(model.encoder) == "nonzero"
    for j, st in enumerate(model.stages, start=1):
        assert _grad_state(st) == ("nonzero" if j <= stage else "none"), f"stage {j} from rec_{stage}"


@pytest.mark.parametrize("detached", [2, 3])
def test_detach_input_stops_the_refiner_loss_at_its_own_stage(make_config, images, detached):
    """With `detach_input` on stage i, stage i's loss trains stage i only: no gradient to stage 1 or the encoder."""
    model = _backward_one_term(make_config, images, detached, detach=(detached,))
    assert _grad_state(model.encoder) == "none"
    for j, st in enumerate(model.stages, start=1):
        assert _grad_state(st) == ("nonzero" if j == detached else "none"), f"stage {j} from rec_{detached}"


def test_detach_input_leaves_the_earlier_stages_loss_untouched(make_config, images):
    """Detaching stage 2 removes exactly its loss's share from the encoder's gradient, no more."""
    torch.manual_seed(0)
    cfg = make_config(n_stages=2, detach=(2,))
    model = NStageVAE(cfg)
    x = images(2, 1, 28)
    eps = torch.randn(2, cfg.latent_dim, generator=torch.Generator().manual_seed(1))
    total, terms = nstage_loss(model(x, eps=eps), x, cfg)
    params = list(model.encoder.parameters()) + list(model.stages[0].parameters())
    g_total = torch.autograd.grad(total, params, retain_graph=True)
    g_first = torch.autograd.grad(terms["kl"] + terms["rec_1"], params)
    for a, b in zip(g_total, g_first):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    # The same model without the flag: stage 2's loss does change the encoder's gradient.
    model.stages[1].detach_input = False
    total, terms = nstage_loss(model(x, eps=eps), x, cfg)
    g_joint = torch.autograd.grad(total, params, retain_graph=True)
    assert any(not torch.allclose(a, b) for a, b in zip(g_joint, g_first))


def test_deep_residual_vae_has_one_loss_on_the_final_image(make_config, images):
    """Stage 1 with loss "none": it is reported but not trained on; its gradient comes through stage 2 only."""
    torch.manual_seed(0)
    cfg = make_config(n_stages=2, losses={1: "none", 2: "l2"})
    model = NStageVAE(cfg)
    x = images(2, 1, 28)
    total, terms = nstage_loss(model(x), x, cfg)
    assert terms["rec_1"].grad_fn is None  # monitored only
    assert torch.equal(total, terms["kl"] + terms["rec_2"])
    total.backward()
    assert _grad_state(model.encoder) == "nonzero"
    assert _grad_state(model.stages[0]) == "nonzero"  # through the refiner: the paper's joint residual VAE

"""SMoE-VAE (reference §9): the authors' loss, dense training mixture, hard top-1 evaluation, supervised routing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from smoe.models import build_model


def _authors_terms(model, images, seed):
    """Recompute the authors' loss_function terms (vae_mixture_of_experts.py) from the model's modules."""
    torch.manual_seed(seed)
    mu, logvar = model.encoder(images)
    z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
    p = F.softmax(model.gate(z), dim=-1)
    return z, p, mu, logvar


def test_unsupervised_loss_equals_the_authors_formula_at_batch_128():
    torch.manual_seed(0)
    model = build_model("vae_debug").train()
    images = torch.rand(128, 1, 28, 28)
    torch.manual_seed(7)
    out = model(images)
    z, p, mu, logvar = _authors_terms(model, images, 7)
    E = 3
    recon = sum(p[:, e, None, None, None] * model.decoders[e](z) for e in range(E))  # dense soft mixture
    torch.testing.assert_close(out.logits, recon)
    mse = F.mse_loss(recon, images, reduction="sum")
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    balance = E * F.mse_loss(p.mean(0), torch.full((E,), 1 / E), reduction="sum")
    entropy = (-(p * torch.log(p + 1e-8)).sum(1)).mean()
    authors_L = mse + 0.01 * kl + 200 * balance + 400 * entropy  # beta, lambda_lb, lambda_ent of the paper
    # per-image scaling: total_loss * 128 is the authors' L at their batch size 128
    torch.testing.assert_close(out.total_loss * 128, authors_L)
    torch.testing.assert_close(out.loss * 128, mse + 0.01 * kl)
    torch.testing.assert_close(out.metrics["recon"], mse / 128)
    torch.testing.assert_close(out.moe_aux[0].losses["balance"], balance)
    torch.testing.assert_close(out.moe_aux[0].losses["entropy"], entropy)
    assert out.aux_loss is out.moe_aux[0].loss


def test_evaluation_uses_the_argmax_decoder_only():
    torch.manual_seed(0)
    model = build_model("vae_debug").eval()
    images = torch.rand(6, 1, 28, 28)
    with torch.no_grad():
        torch.manual_seed(3)
        out = model(images)
        z, p, _, _ = _authors_terms(model, images, 3)  # z is sampled at evaluation too, as in the authors' code
        choice = p.argmax(-1)
        expected = torch.cat([model.decoders[int(e)](z[i : i + 1]) for i, e in enumerate(choice)])
    torch.testing.assert_close(out.logits, expected)
    assert int(out.metrics["active_experts"]) == len(set(choice.tolist()))
    assert torch.equal(out.moe_aux[0].stats["tokens_per_expert"], torch.bincount(choice, minlength=3))


def test_top_2_evaluation_renormalises_the_two_weights():
    torch.manual_seed(0)
    model = build_model("vae_debug", **{"moe.top_k": 2}).eval()
    z = torch.randn(5, 4)
    with torch.no_grad():
        p = model.gate(z).softmax(-1)
        w, idx = p.topk(2, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        expected = torch.stack(
            [sum(w[i, j] * model.decoders[int(idx[i, j])](z[i : i + 1])[0] for j in range(2)) for i in range(5)]
        )
        torch.testing.assert_close(model.decode(z), expected)


def test_supervised_routing_trains_the_gate_on_labels():
    torch.manual_seed(0)
    model = build_model("vae_debug", routing="supervised").train()
    images = torch.rand(4, 1, 28, 28)
    with pytest.raises(ValueError, match="targets_B"):
        model(images)
    labels = torch.tensor([0, 4, 5, 2])  # label % 3 = 0, 1, 2, 2
    torch.manual_seed(1)
    out = model(images, labels)
    z, p, _, _ = _authors_terms(model, images, 1)
    ce = F.cross_entropy(torch.log(p + 1e-8), labels % 3)  # the authors sum it; per image here
    torch.testing.assert_close(out.aux_loss, ce)
    torch.testing.assert_close(out.metrics["gate_accuracy"], (p.argmax(-1) == labels % 3).float().mean())
    # the reconstruction comes from the argmax decoder even in training
    expected = torch.cat([model.decoders[int(e)](z[i : i + 1]) for i, e in enumerate(p.argmax(-1))])
    torch.testing.assert_close(out.logits, expected)
    model.eval()
    assert model(images).aux_loss == 0  # no labels at evaluation: no gate loss


def test_loss_needs_no_labels_and_inputs_are_checked():
    model = build_model("vae_debug")
    assert model(torch.rand(2, 1, 28, 28)).loss is not None
    with pytest.raises(ValueError, match="images must be"):
        model(torch.rand(2, 28, 28))
    with pytest.raises(ValueError, match="targets_B"):
        model(torch.rand(2, 1, 28, 28), torch.zeros(3, dtype=torch.long))


def test_decoders_are_experts_behind_a_registered_router_and_the_engine():
    """The SMoE-VAE is an smoe.MoE: token-choice router with the authors' gate MLP, decoders as ModuleExperts; the
    engine's seam path equals its reference on the reconstruction and on every gradient."""
    import smoe

    torch.manual_seed(0)
    model = build_model("vae_debug").train()
    assert isinstance(model.moe, smoe.MoE) and model.moe.router.registry_name == "token_choice"
    assert isinstance(model.moe.experts, smoe.ModuleExperts) and model.decoders is model.moe.experts
    assert model.moe.router.top_k == 3 and model.moe.router.eval_top_k == 1  # dense mixture, top-1 evaluation
    images = torch.rand(4, 1, 28, 28)
    results = {}
    for backend in ("reference", "unfused"):
        model.zero_grad(set_to_none=True)
        model.moe.backend = backend
        torch.manual_seed(2)
        out = model(images)
        out.total_loss.backward()
        results[backend] = (out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    (y_ref, g_ref), (y_seam, g_seam) = results["reference"], results["unfused"]
    torch.testing.assert_close(y_seam, y_ref)
    for name in g_ref:
        torch.testing.assert_close(g_seam[name], g_ref[name], msg=name)
    assert all(g.abs().sum() > 0 for n, g in g_seam.items() if n.startswith("moe.experts.")), "every decoder learns"

"""SMoE-VAE: a shared encoder and a sparse mixture of *decoder* experts (Nikolic, Oguz, Psaltis, arXiv 2509.10025;
reference §9, architecture and losses from the authors' code ``strajdzsha/smoe-vae``).

Shape legend: ``B`` images, ``C`` channels, ``H = W`` image side, ``Z`` latent width, ``E`` decoder experts,
``K`` experts used at evaluation (1 in the paper).

Forward pass (§9.2-9.4)::

    mu, logvar = encoder(x);  z = mu + eps * exp(logvar / 2)          # reparameterisation
    p = softmax(gate(z))                                               # gate: MLP Z -> 64 -> 32 -> E on the latent
    unsupervised, training:  x_hat = sum_e p_e * D_e(z)                # dense: every decoder runs on every image
    evaluation (and supervised training):  x_hat = D_{argmax p}(z)     # hard top-1 (top-K, renormalised, if K > 1)

Losses, per the authors' code (sums over pixels, latent units and the batch)::

    L = sum MSE(x_hat, x) + beta * KL(N(mu, sigma^2) || N(0, I))                       -> ModelOutput.loss
      + lambda_lb * E * sum_e (mean_b p_be - 1/E)^2 + lambda_ent * mean_b H(p_b)      -> ModelOutput.aux_loss
        (unsupervised; supervised: + w * sum_b CE(log(p_b + 1e-8), label_b mod E))

Scaling. We return per-image values: ``loss = (sum recon + beta * sum KL) / B`` and, since the balance and entropy
terms are batch means that the authors add to batch *sums*, ``aux_loss = (lambda_lb * lb + lambda_ent * ent) /
coefficient_batch_size`` (128, the authors' batch size). So ``total_loss * 128`` is exactly the authors' ``L`` at
batch size 128 (Adam is invariant to that constant factor), and the relative weight of the routing terms does not
change with the batch size. The supervised gate loss is a sum in the authors' code, so it becomes a batch mean.
The VAE needs no labels: its targets are its inputs, so ``loss`` is computed on every call.

Routers and engine. The decoders are real experts (:class:`~smoe.experts.module.ModuleExperts`: each maps a
``(M, Z)`` latent row to an ``(M, C, H, W)`` image) behind a real router, ``token_choice`` with the authors' MLP gate
(``gate_hidden_dims``, :class:`~smoe.routing.gated.MLPGate`), softmax scores and no router loss of its own; one
:class:`smoe.MoE` layer runs them through the engine like any other. The paper's two routing regimes are two
settings of that router: the dense training mixture is top-``E`` (every decoder on every image, weights ``p``:
``sum_e p_e D_e(z)``), hard evaluation is top-``K`` with the kept weights renormalised (weight 1 for ``K = 1``);
supervised training is top-``K`` too. The routing terms above are the VAE's own losses, computed from the router
probabilities the layer returns (``MoEAux.probs_TE``). One difference in a case the paper does not use: with
``K > 1`` in supervised training, the renormalised weights are differentiable, so the gate also learns from the
reconstruction (the authors' ``K = 1`` gives weight 1 and no such gradient).

Checkpoints written before the decoders became experts (``gate.*``, ``decoders.*``) load unchanged: their keys are
renamed to ``moe.router.gate.*`` and ``moe.experts.*`` on load.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smoe.experts import ModuleExperts
from smoe.layers import MoE
from smoe.models.accounting import AccountingMixin
from smoe.models.config import VAEConfig
from smoe.models.output import ModelOutput
from smoe.routing.registry import build_router

__all__ = ["SMoEVAE", "ConvEncoder", "ConvDecoder"]

#: old parameter names -> where they live now (checkpoints written before the decoders became experts)
_RENAMED = (("gate.", "moe.router.gate."), ("decoders.", "moe.experts."))


class ConvEncoder(nn.Module):
    """The authors' ``ConvEncoder`` ("medium"): three 3x3 convs (strides 1, 2, 2) with ReLU, then ``fc_mu`` and
    ``fc_logvar`` on the flattened ``c3 x H/4 x W/4`` map."""

    def __init__(
        self, in_channels: int, image_size: int, channels: tuple[int, ...], latent_dim: int, device=None, dtype=None
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        c1, c2, c3 = channels
        self.conv1 = nn.Conv2d(in_channels, c1, 3, stride=1, padding=1, **dd)
        self.conv2 = nn.Conv2d(c1, c2, 3, stride=2, padding=1, **dd)
        self.conv3 = nn.Conv2d(c2, c3, 3, stride=2, padding=1, **dd)
        flat = c3 * (image_size // 4) ** 2
        self.fc_mu = nn.Linear(flat, latent_dim, **dd)
        self.fc_logvar = nn.Linear(flat, latent_dim, **dd)

    def forward(self, x_BCHW: Tensor) -> tuple[Tensor, Tensor]:
        """Returns ``(mu_BZ, logvar_BZ)``."""
        h = F.relu(self.conv3(F.relu(self.conv2(F.relu(self.conv1(x_BCHW))))))
        h = h.flatten(1)
        return self.fc_mu(h), self.fc_logvar(h)


class ConvDecoder(nn.Module):
    """One decoder expert, the authors' ``ConvDecoderLite``: Linear ``Z -> c1 x H/4 x W/4``, nearest upsample x2,
    3x3 conv ``c1 -> c2`` + ELU, upsample x2, 3x3 conv ``c2 -> C`` + sigmoid."""

    def __init__(
        self, latent_dim: int, image_size: int, channels: tuple[int, ...], out_channels: int, device=None, dtype=None
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        c1, c2 = channels
        self.c1, self.side = c1, image_size // 4
        self.fc = nn.Linear(latent_dim, c1 * self.side**2, **dd)
        self.conv1 = nn.Conv2d(c1, c2, 3, padding=1, **dd)
        self.conv2 = nn.Conv2d(c2, out_channels, 3, padding=1, **dd)

    def forward(self, z_BZ: Tensor) -> Tensor:
        h = self.fc(z_BZ).view(-1, self.c1, self.side, self.side)
        h = F.elu(self.conv1(F.interpolate(h, scale_factor=2, mode="nearest")))
        return torch.sigmoid(self.conv2(F.interpolate(h, scale_factor=2, mode="nearest")))


class SMoEVAE(AccountingMixin, nn.Module):
    """Variational autoencoder with a mixture of decoder experts (see the module docstring).

    Args:
        config: a :class:`~smoe.models.config.VAEConfig`.

    ``forward(images_BCHW, targets_B=None) -> ModelOutput``: ``logits`` is the reconstruction ``(B, C, H, W)`` in
    ``[0, 1]``; ``loss`` the per-image negative ELBO ``recon + beta * KL``; ``aux_loss`` the routing terms;
    ``moe_aux`` one :class:`~smoe.layers.moe.MoEAux`; ``metrics``: ``recon`` (sum-MSE per image, the paper's test
    metric), ``kl`` (per image), ``balance``, ``entropy``, ``active_experts`` (experts that are some image's
    argmax), and ``gate_accuracy`` (supervised, with targets).
    """

    def __init__(self, config: VAEConfig, device=None, dtype=None) -> None:
        super().__init__()
        if not isinstance(config, VAEConfig):
            raise ValueError(f"SMoEVAE needs a VAEConfig, got {type(config).__name__}")
        self.config = config
        c = config
        dd = {"device": device, "dtype": dtype}
        self.num_experts, self.top_k = c.moe.num_experts, c.moe.top_k
        self.encoder = ConvEncoder(c.in_channels, c.image_size, c.encoder_channels, c.latent_dim, **dd)
        # training routes top-E (the dense mixture) unsupervised, top-K supervised; evaluation top-K (renormalised)
        train_k = self.num_experts if c.routing == "unsupervised" else self.top_k
        router = build_router(
            "token_choice",
            dim=c.latent_dim,
            num_experts=self.num_experts,
            top_k=train_k,
            eval_top_k=self.top_k,
            renormalize=True,
            balance_loss_weight=0.0,
            gate_hidden_dims=c.gate_hidden_dims,
            **dd,
        )
        decoders = ModuleExperts(
            (
                ConvDecoder(c.latent_dim, c.image_size, c.decoder_channels, c.in_channels, **dd)
                for _ in range(self.num_experts)
            ),
            dim=c.latent_dim,
        )
        self.moe = MoE(
            c.latent_dim, None, self.num_experts, train_k, router=router, experts=decoders, check_inputs=False
        )
        self.register_load_state_dict_pre_hook(_rename_old_keys)

    @property
    def gate(self) -> nn.Module:
        """The gate MLP on the latent (``(B, Z) -> (B, E)`` float32 logits)."""
        return self.moe.router.gate

    @property
    def decoders(self) -> ModuleExperts:
        """The decoder experts; ``decoders[e]`` maps ``(B, Z)`` latents to ``(B, C, H, W)`` images."""
        return self.moe.experts

    def _check(self, images_BCHW: Tensor, targets_B: Tensor | None) -> None:
        c = self.config
        expected = (c.in_channels, c.image_size, c.image_size)
        if images_BCHW.dim() != 4 or tuple(images_BCHW.shape[1:]) != expected:
            raise ValueError(f"images must be (B, {', '.join(map(str, expected))}), got {tuple(images_BCHW.shape)}")
        if not images_BCHW.is_floating_point():
            raise ValueError(f"images must be a floating-point tensor in [0, 1], got {images_BCHW.dtype}")
        if targets_B is not None and targets_B.shape != images_BCHW.shape[:1]:
            raise ValueError(f"targets_B must have shape ({images_BCHW.shape[0]},), got {tuple(targets_B.shape)}")
        if c.routing == "supervised" and self.training and targets_B is None:
            raise ValueError("routing='supervised' trains the gate on class labels: pass targets_B in training")

    def decode(self, z_BZ: Tensor) -> Tensor:
        """Reconstruction of given latents (e.g. ``encoder(x)[0]`` for a deterministic one, or samples from the
        prior) by the MoE layer in its current mode: top-``K`` decoders in ``eval()``. ``(B, Z) -> (B, C, H, W)``."""
        return self.moe(z_BZ)[0]

    def forward(self, images_BCHW: Tensor, targets_B: Tensor | None = None) -> ModelOutput:
        """Encode, route, decode; see the class docstring for the outputs."""
        self._check(images_BCHW, targets_B)
        c = self.config
        B, E = images_BCHW.shape[0], self.num_experts
        mu_BZ, logvar_BZ = self.encoder(images_BCHW)
        # sampled in evaluation too, as the authors' code (their test reconstruction loss is on a sampled z)
        z_BZ = mu_BZ + torch.randn_like(mu_BZ) * torch.exp(0.5 * logvar_BZ)
        # router -> plan -> dispatch -> decoder experts -> combine: dense mixture (training) or top-K (evaluation)
        recon_BCHW, moe_aux = self.moe(z_BZ)
        probs_BE = moe_aux.probs_TE

        recon_sum = F.mse_loss(recon_BCHW.float(), images_BCHW.float(), reduction="sum")
        kl_sum = -0.5 * torch.sum(1 + logvar_BZ.float() - mu_BZ.float().pow(2) - logvar_BZ.float().exp())
        loss = (recon_sum + c.beta * kl_sum) / B
        losses: dict[str, Tensor] = {}
        metrics: dict[str, Tensor] = {"recon": recon_sum.detach() / B, "kl": kl_sum.detach() / B}
        # routing terms (authors' loss_function): balance of the mean usage, sharpness of each image's distribution
        usage_E = probs_BE.mean(dim=0)
        balance = E * (usage_E - 1.0 / E).square().sum()
        entropy = -(probs_BE * torch.log(probs_BE + 1e-8)).sum(dim=-1).mean()
        metrics["balance"], metrics["entropy"] = balance.detach(), entropy.detach()
        if c.routing == "unsupervised":
            losses = {"balance": balance, "entropy": entropy}
            aux = (c.balance_weight * balance + c.entropy_weight * entropy) / c.coefficient_batch_size
        elif targets_B is not None:
            expert_B = targets_B % E
            losses = {"gate_ce": F.cross_entropy(torch.log(probs_BE + 1e-8), expert_B)}
            aux = c.supervised_weight * losses["gate_ce"]
            metrics["gate_accuracy"] = (probs_BE.argmax(dim=-1) == expert_B).float().mean()
        else:
            aux = probs_BE.new_zeros(())
        counts_E = torch.bincount(probs_BE.argmax(dim=-1), minlength=E)
        metrics["active_experts"] = (counts_E > 0).sum()
        stats = {**moe_aux.stats, **{f"loss_{k}": v.detach() for k, v in losses.items()}}
        moe_aux = dataclasses.replace(moe_aux, loss=aux, losses=losses, stats=stats)
        return ModelOutput(logits=recon_BCHW, loss=loss, aux_loss=aux, moe_aux=[moe_aux], metrics=metrics)

    def _accounting(self) -> dict[str, float]:
        """Inference accounting per image (``tokens_per_sample = 1``): encoder + gate + ``K`` decoders. Training in
        unsupervised mode runs all ``E`` decoders (``train_flops_per_sample``)."""
        side = self.config.image_size

        def conv_flops(conv: nn.Conv2d, out_side: int) -> int:
            return 2 * conv.weight.numel() * out_side**2

        enc = self.encoder
        enc_flops = conv_flops(enc.conv1, side) + conv_flops(enc.conv2, side // 2) + conv_flops(enc.conv3, side // 4)
        enc_flops += 2 * (enc.fc_mu.weight.numel() + enc.fc_logvar.weight.numel())
        gate_flops = 2 * sum(m.weight.numel() for m in self.gate.modules() if isinstance(m, nn.Linear))
        dec = self.decoders[0]
        dec_flops = 2 * dec.fc.weight.numel() + conv_flops(dec.conv1, side // 2) + conv_flops(dec.conv2, side)
        dec_params = sum(p.numel() for p in dec.parameters())
        shared = sum(p.numel() for p in self.parameters()) - self.num_experts * dec_params
        return {
            "num_active_parameters": shared + self.top_k * dec_params,
            "flops_per_token": enc_flops + gate_flops + self.top_k * dec_flops,
            "tokens_per_sample": 1,
            "train_flops_per_sample": enc_flops + gate_flops + self.num_experts * dec_flops,
        }


def _rename_old_keys(module, state_dict, prefix, *args) -> None:
    """``load_state_dict`` pre-hook: old ``gate.*`` / ``decoders.*`` keys become ``moe.router.gate.*`` /
    ``moe.experts.*``."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        for old, new in _RENAMED:
            if key.startswith(prefix + old):
                state_dict[prefix + new + key[len(prefix + old) :]] = state_dict.pop(key)

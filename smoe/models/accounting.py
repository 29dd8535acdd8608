"""Parameter and FLOP accounting: total parameters, active parameters per token, forward FLOPs per token.

Every model mixes in :class:`AccountingMixin`, whose :meth:`~AccountingMixin.accounting` returns one dict::

    {"num_parameters":        every parameter, counted once (tied weights once),
     "num_active_parameters": parameters one token uses in a forward pass,
     "flops_per_token":       forward FLOPs per token,
     "tokens_per_sample":     tokens of one sample (LM: seq_len; ViT: tokens per image; VAE: 1 = the image),
     "flops_per_sample":      flops_per_token * tokens_per_sample}

``num_parameters()``, ``num_active_parameters()`` and ``flops_per_token()`` are shortcuts to the same numbers.
Everything is computed from parameter shapes, so it works on the meta device (paper-sized presets). A model whose
experts are sharded over processes (expert parallelism) is counted whole: the experts held elsewhere are included.

Conventions (stated, because papers differ):

* **Active parameters** = all parameters minus, in each MoE layer, the routed experts a token does not use:
  ``total - sum_layers expert_params * (1 - k / E)``. Embedding tables count in full (as Mixtral and DeepSeek
  report; Kaplan et al. 2020 exclude them). ``k`` is the *nominal* number of experts per token, as the router
  declares it (:meth:`smoe.Router.experts_per_token`): ``top_k`` for token choice (capacity drops make the real
  number smaller), the capacity factor for expert choice (each expert takes ``cf * S / E`` of ``S`` tokens), or,
  for Soft MoE, the slots per token ``E * C / S`` (every expert evaluates ``C`` slots per group of ``S`` tokens;
  ``S`` is the layer's ``group_size``, or the sequence length in ``group_mode="sequence"``; in the other modes
  ``S`` depends on the batch and the count falls back to ``top_k``).
* **FLOPs** count multiply-adds of matrix products as 2 FLOPs: ``2 * weights`` for every linear layer a token
  passes through (attention projections, dense MLPs, router gates = router parameters with >= 2 dims, ``k``
  experts (``Experts.flops_per_row``), shared experts and their gate, the output head even when tied; the
  router's own extra work, ``Router.extra_flops_per_token``: Soft MoE's slot mixing, ``2 * E * C * D`` each for
  dispatch and combine), plus ``4 * context * D`` per attention layer for the
  ``QK^T`` and ``PV`` products over the full context (no halving for causal masks, as Kaplan et al. 2020 and
  PaLM count). Norms, biases, softmax, activations, embedding lookups and routing sorts are not counted. This is
  exactly what :class:`torch.utils.flop_counter.FlopCounterMode` measures on the reference engine and the manual
  attention path (tested).
"""

from __future__ import annotations

from torch import nn

from smoe.layers import MLP, MoE

__all__ = [
    "AccountingMixin",
    "experts_per_token",
    "moe_inactive_parameters",
    "transformer_flops_per_token",
    "linear_weight_count",
]


def _known_group_size(moe: MoE, context_len: int | None) -> int | None:
    """Tokens per routing group of ``moe`` when the model's shapes fix it (``group_size``, or the sequence length
    in ``group_mode="sequence"``); ``None`` when it depends on the batch."""
    if moe.group_size is not None:
        return moe.group_size
    if moe.group_mode == "sequence":
        return context_len
    return None


def experts_per_token(moe: MoE, context_len: int | None = None) -> float:
    """Nominal experts one token uses in ``moe``, as its router declares (:meth:`smoe.Router.experts_per_token`).

    Args:
        moe: the layer.
        context_len: tokens per sequence of the model (sets the group size in ``"sequence"`` mode).
    """
    return float(moe.router.experts_per_token(_known_group_size(moe, context_len)))


def expert_parameters(moe: MoE) -> float:
    """Parameters of all ``E`` routed experts of ``moe``, also when this process holds only some of them (expert
    parallelism: the local experts' count scaled by ``E / E_local``)."""
    local = sum(p.numel() for p in moe.experts.parameters())
    return local * moe.num_experts / moe.experts.num_experts


def moe_inactive_parameters(moe: MoE, context_len: int | None = None) -> float:
    """Routed-expert parameters of ``moe`` that one token does not use: ``expert_params * (1 - k / E)``."""
    expert_params = expert_parameters(moe)
    k = experts_per_token(moe, context_len)
    return expert_params * (1.0 - min(k, moe.num_experts) / moe.num_experts)


def linear_weight_count(module: nn.Module) -> int:
    """Weights of the ``nn.Linear`` layers inside ``module`` (each counted once)."""
    seen = {id(m.weight): m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear)}
    return sum(seen.values())


def _moe_flops_per_token(moe: MoE, context_len: int | None = None) -> float:
    router_weights = sum(p.numel() for p in moe.router.parameters() if p.dim() >= 2)
    flops = 2 * router_weights + experts_per_token(moe, context_len) * moe.experts.flops_per_row()
    flops += moe.router.extra_flops_per_token()  # e.g. Soft MoE's slot mixing
    if moe.shared_expert is not None:
        flops += 2 * linear_weight_count(moe.shared_expert)
    if moe.shared_expert_gate is not None:
        flops += 2 * moe.shared_expert_gate.weight.numel()
    return flops


def transformer_flops_per_token(trunk: nn.Module, *, context_len: int) -> float:
    """Forward FLOPs per token of a :class:`~smoe.models.block.Transformer` trunk.

    Args:
        trunk: the stack of blocks.
        context_len: keys each query attends to (the LM's ``seq_len``, the ViT's tokens per image).
    """
    flops = 0.0
    for block in trunk.blocks:
        attn = block.attn
        flops += 2 * linear_weight_count(attn) + 4 * context_len * attn.dim
        if isinstance(block.ffn, MoE):
            flops += _moe_flops_per_token(block.ffn, context_len)
        elif isinstance(block.ffn, MLP):
            flops += 2 * linear_weight_count(block.ffn)
        else:  # pragma: no cover - blocks hold an MLP or an MoE
            raise ValueError(f"cannot count FLOPs of a {type(block.ffn).__name__} feed-forward")
    return flops


def _as_number(x: float) -> int | float:
    return int(round(x)) if abs(x - round(x)) < 1e-6 else x


class AccountingMixin:
    """Adds :meth:`accounting` (and three shortcuts) to a model that implements ``_accounting()``.

    ``_accounting()`` returns at least ``flops_per_token`` and ``tokens_per_sample``; it may also return
    ``num_active_parameters`` to replace the default rule (the SMoE-VAE does).
    """

    def accounting(self) -> dict[str, int | float]:
        """Parameter and FLOP counts (see the module docstring for the conventions)."""
        params = {id(p): p.numel() for p in self.parameters()}  # tied weights once
        total = sum(params.values())
        moes = [m for m in self.modules() if isinstance(m, MoE)]
        # the experts other processes hold (expert parallelism): the model is counted whole
        total += sum(expert_parameters(m) - sum(p.numel() for p in m.experts.parameters()) for m in moes)
        own = self._accounting()
        context = int(own["tokens_per_sample"])
        inactive = sum(moe_inactive_parameters(m, context) for m in moes)
        out: dict[str, float] = {"num_parameters": total, "num_active_parameters": total - inactive}
        out.update(own)
        out["flops_per_sample"] = out["flops_per_token"] * out["tokens_per_sample"]
        return {k: _as_number(v) for k, v in out.items()}

    def num_parameters(self) -> int:
        """All parameters, tied ones counted once."""
        return self.accounting()["num_parameters"]

    def num_active_parameters(self) -> int | float:
        """Parameters one token uses in a forward pass."""
        return self.accounting()["num_active_parameters"]

    def flops_per_token(self) -> int | float:
        """Forward FLOPs per token."""
        return self.accounting()["flops_per_token"]

    def _accounting(self) -> dict[str, float]:  # pragma: no cover - implemented by each model
        raise NotImplementedError

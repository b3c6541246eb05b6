"""The torch module that becomes one block's training graph: body + local head + local loss."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy written as log-softmax + gather, over every label: ``logits [B, C]`` with
    ``labels [B]``, or per token ``logits [B, T, C]`` with ``labels [B, T]`` (the classes are the last axis).

    torch's ``F.cross_entropy`` exports as SoftmaxCrossEntropyLoss without the optional log-prob
    output that ORT's gradient builder reads; this form exports to ops that all train as-is.
    """
    return -torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).mean()


class LocalBlock(nn.Module):
    """``forward(x, labels) -> (loss, logits[, y])``.

    ``x`` enters as a graph input, so no gradient can leave the block: the block-local property
    holds by construction in ONNX, which has no stop-gradient. ``y`` (the activation for the next
    block) is returned by every block but the last.
    """

    def __init__(self, units: Sequence[nn.Module], head: nn.Module, *, emits_message: bool) -> None:
        super().__init__()
        self.body = nn.Sequential(*units)
        self.head = head
        self.emits_message = emits_message

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = self.body(x)
        logits = self.head(y)
        loss = cross_entropy(logits, labels)
        return (loss, logits, y) if self.emits_message else (loss, logits)


LATENTS = ("categorical", "bernoulli")


class BLLForwardBlock(nn.Module):
    """BLL forward block k < K-1: ``forward(x, prior) -> (loss, logits, y, kl)``.

    ``logits`` are the natural parameters a_k of the block's latent z_k (one unit per class, read
    out from the feature map by the head); ``y`` (the feature map) is the message up. ``prior`` is
    m * b_k: the mixing weight times the feedback block's natural parameters. The posterior
    rho ∝ alpha * beta has natural parameters a + prior (categorical: rho = softmax(a + prior);
    Bernoulli: rho = sigmoid(a + prior) per unit), and the method's loss is KL(rho || alpha) with
    rho a fixed target. ONNX has no stop-gradient, so the graph's loss is a surrogate whose
    gradient in a is exactly that KL's with rho held fixed, mean(alpha) - rho:
    categorical: logsumexp(a) - logsumexp(a + prior); Bernoulli: sum(softplus(a) - softplus(a + prior)).
    The KL itself is the ``kl`` output, for reporting. The classes are the last axis: a sequence
    block has one latent per token (``a [B, T, C]``) and its losses are means over the tokens.
    """

    def __init__(self, units: Sequence[nn.Module], head: nn.Module, latent: str = "categorical") -> None:
        super().__init__()
        self.body = nn.Sequential(*units)
        self.head = head
        self.latent = latent

    def forward(self, x: torch.Tensor, prior: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = self.body(x)
        a = self.head(y)
        posterior = a + prior
        if self.latent == "categorical":
            surrogate = (logsumexp(a) - logsumexp(posterior)).mean()
            return surrogate, a, y, categorical_kl(posterior, a)
        surrogate = (softplus(a) - softplus(posterior)).sum(-1).mean()
        return surrogate, a, y, bernoulli_kl(posterior, a)


class FeedbackBlock(nn.Module):
    """BLL feedback block g_k: ``forward(beta, target) -> (loss, logits, beta_out)``.

    Maps the message from above (beta_{k+1}: the one-hot target for the top feedback block, else
    the upper feedback block's probabilities) to natural parameters b_k over block k's latent,
    and sends the probabilities down (softmax(b_k), or sigmoid(b_k) for Bernoulli latents). Its
    local loss is a read-out of the target: the cross-entropy of that distribution against the
    one-hot label, so its messages carry what the label says about z_k. The target enters as an
    input; nothing from the forward blocks does. The layers act on the last axis: with per-token
    targets ``[B, T, C]`` the block maps each token's beta on its own.

    A learnable skip ``skip * beta`` (when the latent has as many units as beta) starts the block
    close to passing the label through: an untrained feedback net sends noise, and the forward
    blocks' posteriors would follow that noise for the first hundred steps (measured: -14 points
    on block 0 after 128 steps of cnn-small).
    """

    def __init__(self, in_features: int, latent_units: int, latent: str = "categorical", hidden: int = 64,
                 skip_init: float = 4.0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, latent_units))
        self.latent = latent
        self.skip = nn.Parameter(torch.tensor(skip_init)) if in_features == latent_units else None

    def forward(self, beta: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b = self.net(beta)
        if self.skip is not None:
            b = b + self.skip * beta
        if self.latent == "categorical":
            loss = -(target * torch.log_softmax(b, dim=-1)).sum(-1).mean()
            return loss, b, torch.softmax(b, dim=-1)
        loss = (softplus(b) - target * b).sum(-1).mean()  # BCE-with-logits, summed over units
        return loss, b, torch.sigmoid(b)


def logsumexp(z: torch.Tensor) -> torch.Tensor:
    """log sum exp over the last axis, via log-softmax (which ORT differentiates): z_i - log_softmax(z)_i for any i."""
    return (z - torch.log_softmax(z, dim=-1)).mean(-1)


def categorical_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """Mean over the batch (and tokens) of KL(softmax(p) || softmax(q)), classes on the last axis."""
    log_p = torch.log_softmax(p_logits, dim=-1)
    return (log_p.exp() * (log_p - torch.log_softmax(q_logits, dim=-1))).sum(-1).mean()


def softplus(z: torch.Tensor) -> torch.Tensor:
    """log(1 + e^z), written with ops that ORT 1.19 differentiates and that never overflow.

    ORT has no gradient for Softplus, and logsigmoid exports as Log(Sigmoid(z)), which turns into
    log(0) = -inf (and NaN gradients) once |z| > ~88. Here: (z + |z|) / 2 + log(1 + exp(-|z|)), with
    |z| = relu(z) + relu(-z) (no Abs gradient needed; its subgradient at 0 is 0, which keeps the
    derivative at z = 0 exactly 1/2); exp(-|z|) is in (0, 1].
    """
    magnitude = torch.relu(z) + torch.relu(-z)
    return 0.5 * (z + magnitude) + torch.log(1 + torch.exp(-magnitude))


def bernoulli_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """Mean over the batch (and tokens) of sum over units of KL(Bernoulli(sigmoid(p)) || Bernoulli(sigmoid(q))).

    log sigmoid(z) = -softplus(-z) and log(1 - sigmoid(z)) = -softplus(z): finite for every z.
    """
    p = torch.sigmoid(p_logits)
    log_p, log_not_p = -softplus(-p_logits), -softplus(p_logits)
    log_q, log_not_q = -softplus(-q_logits), -softplus(q_logits)
    return (p * (log_p - log_q) + (1 - p) * (log_not_p - log_not_q)).sum(-1).mean()

"""Module-level references: GMixout as the authors' layer, and the original Mixout.

They change how the model computes its weights (``torch.func.functional_call``), which is
what the optimizer-level ``GMixoutOptimizer`` avoids; they exist to check it against, and
as the Mixout baseline.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.func import functional_call
from torch.optim import Optimizer

from . import kernels
from .kernels import Segment, support_capacity
from .groups import gmixout_param_groups

__all__ = ["GMixoutReference", "MixoutReference", "gmixout_parameter_names"]


def gmixout_parameter_names(model: nn.Module, **group_kwargs: Any) -> list[str]:
    """Names of the parameters that ``gmixout_param_groups(model)`` puts in its GMixout group."""
    groups = gmixout_param_groups(model, **group_kwargs)
    sparse = {id(t) for g in groups if g["gmixout"] for t in g["params"]}
    return [name for name, t in model.named_parameters() if id(t) in sparse]


class GMixoutReference(nn.Module):
    r"""GMixout written at the module level, like the authors' sparse layer.

    For each named weight the anchor :math:`A` is a buffer and the residual :math:`v`
    (one value per support element) is the only trainable tensor; the forward pass uses
    :math:`W = A + \mathrm{scatter}(S, v)/(1-p)`, so autograd gives
    :math:`\nabla_v = \nabla_W[S]/(1-p)`. Every ``resample_every`` calls of :meth:`step`
    the residual is merged (``ema``: :math:`A[S] \mathrel{+}= (1-\lambda) v/(1-p)`;
    ``residual``: :math:`A[S] \mathrel{+}= (1-\lambda) v`), a new support is drawn and the
    inner state is carried by ``state_policy`` (remap through dense index maps, carry
    by position, reset). Supports come from the same RNG as the optimizer, keyed by
    ``keys[name]`` (default: the position of the name in ``names``, which is the key the
    optimizer gives a GMixout group listed first).

    The inner optimizer is built by ``inner(param_groups)`` over two groups: the residuals
    (in ``names`` order) and the model's other trainable parameters.
    """

    def __init__(
        self,
        model: nn.Module,
        names: Iterable[str],
        inner: Callable[[list[dict]], Optimizer],
        *,
        p: float = 0.9,
        ema_decay: float = 0.3,
        resample_every: int = 50,
        merge: str = "ema",
        state_policy: str = "remap",
        seed: int = 0,
        keys: dict[str, int] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.names = list(names)
        self.keep = 1.0 - p
        self.ema_decay, self.resample_every = ema_decay, resample_every
        self.merge_rule, self.state_policy, self.seed = merge, state_policy, seed
        self.keys = keys if keys is not None else {n: i for i, n in enumerate(self.names)}
        params = dict(model.named_parameters())
        self.anchors = {n: params[n].detach().clone() for n in self.names}
        for n in self.names:
            params[n].requires_grad_(False)
        self.dense = [t for n, t in model.named_parameters() if n not in self.anchors and t.requires_grad]
        self.episode, self.episode_step = 0, 0
        self.supports = {n: self._draw(n) for n in self.names}
        self.residuals = {n: torch.zeros(len(self.supports[n]), requires_grad=True) for n in self.names}
        groups = [{"params": [self.residuals[n] for n in self.names]}]
        if self.dense:
            groups.append({"params": self.dense})
        self.optimizer = inner(groups)

    def _draw(self, name: str) -> torch.Tensor:
        anchor = self.anchors[name]
        capacity = support_capacity(anchor.numel(), self.keep)
        segments = [Segment(0, anchor.numel(), self.keys[name], 0)]
        support, n = kernels.draw_support(segments, self.seed, self.episode, self.keep, capacity, anchor.device)
        if n > capacity:
            support, n = kernels.draw_support(segments, self.seed, self.episode, self.keep, n, anchor.device)
        return support[:n].long()

    def training_weights(self) -> dict[str, torch.Tensor]:
        """``W = A + scatter(S, v)/(1-p)`` for every GMixout weight (differentiable in ``v``)."""
        weights = {}
        for n in self.names:
            anchor = self.anchors[n]
            flat = torch.zeros(anchor.numel(), dtype=anchor.dtype, device=anchor.device)
            flat = flat.index_put((self.supports[n],), (self.residuals[n] / self.keep).to(anchor.dtype))
            weights[n] = anchor + flat.view_as(anchor)
        return weights

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self.model, self.training_weights(), args, kwargs, strict=False)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self) -> None:
        """One inner step; at the end of an episode merge, redraw and carry the inner state."""
        self.optimizer.step()
        self.episode_step += 1
        if self.episode_step == self.resample_every:
            self.merge()
            self.episode, self.episode_step = self.episode + 1, 0
            self._redraw()

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the residuals into the anchors."""
        coeff = (1.0 - self.ema_decay) / self.keep if self.merge_rule == "ema" else 1.0 - self.ema_decay
        for n in self.names:
            flat = self.anchors[n].view(-1)
            flat[self.supports[n]] = flat[self.supports[n]] + coeff * self.residuals[n].to(flat.dtype)

    @torch.no_grad()
    def _redraw(self) -> None:
        group = self.optimizer.param_groups[0]
        for i, n in enumerate(self.names):
            old_v, old_support = self.residuals[n], self.supports[n]
            new_support = self._draw(n)
            new_v = torch.zeros(len(new_support), requires_grad=True)
            state = self.optimizer.state.pop(old_v, {})
            if self.state_policy == "reset":
                state = {}
            for key, value in list(state.items()):
                if not (torch.is_tensor(value) and value.shape == old_v.shape and value.dim() == 1):
                    continue
                if self.state_policy == "remap":  # through a dense copy: the plainest form of the rule
                    dense = torch.zeros(self.anchors[n].numel(), dtype=value.dtype)
                    dense[old_support] = value
                    state[key] = dense[new_support].clone()
                else:  # carry: same positions of the compact vector
                    carried = torch.zeros(len(new_support), dtype=value.dtype)
                    m = min(len(new_support), len(value))
                    carried[:m] = value[:m]
                    state[key] = carried
            if state:
                self.optimizer.state[new_v] = state
            group["params"][i] = new_v
            self.residuals[n], self.supports[n] = new_v, new_support

    @torch.no_grad()
    def finalize(self) -> None:
        """Merge the running episode and write the anchors into the model: a plain dense model."""
        self.merge()
        params = dict(self.model.named_parameters())
        for n in self.names:
            params[n].copy_(self.anchors[n])
            params[n].requires_grad_(True)


class MixoutReference(nn.Module):
    r"""The original Mixout (Lee et al., ICLR 2020) as a model wrapper.

    In training, each forward pass uses :math:`W = u + M \odot (w - u)/(1 - p)` with
    :math:`M \sim \mathrm{Bernoulli}(1-p)` redrawn per pass and :math:`u` the pretrained
    weights; :math:`w` (the model's own parameter) is what any optimizer trains. In eval
    mode the model runs on :math:`w`. ``names`` default to the weights GMixout would take.
    """

    def __init__(self, model: nn.Module, names: Iterable[str] | None = None, p: float = 0.9,
                 seed: int = 0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"p must be in [0, 1), got {p!r}")
        self.model = model
        self.p = p
        self.names = list(names) if names is not None else gmixout_parameter_names(model)
        params = dict(model.named_parameters())
        self.pretrained = {n: params[n].detach().clone() for n in self.names}
        self.generator = torch.Generator().manual_seed(seed)

    def mixed_weights(self) -> dict[str, torch.Tensor]:
        params = dict(self.model.named_parameters())
        weights = {}
        for n in self.names:
            w, u = params[n], self.pretrained[n].to(params[n].device)
            mask = torch.rand(w.shape, generator=self.generator) >= self.p
            weights[n] = u + mask.to(device=w.device, dtype=w.dtype) * (w - u) / (1.0 - self.p)
        return weights

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.training or self.p == 0.0:
            return self.model(*args, **kwargs)
        return functional_call(self.model, self.mixed_weights(), args, kwargs, strict=False)

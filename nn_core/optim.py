"""Adam's step without the Python around it.

`torch.optim.Adam(fused=True).step()` ends in one fused kernel per device (`torch._fused_adam_`), but
reaches it through ~30 us of Python a step on this machine: a profiler range, hooks, grouping the
tensors by device, re-reading every parameter's state, and on its first call an import of
torch._dynamo (~0.9 s: the optimizer's methods are wrapped in torch._disable_dynamo). For a model of
40,000 parameters that is as much as the update itself (bench/bench_training.py).

`FusedAdamStep` makes the same kernel call on the optimizer's own parameters, state and
hyperparameters, read every step (so the LR schedulers, OneCycle's betas and checkpoints work on the
optimizer object as usual): the parameters after a step are bit-identical to `optimizer.step()`'s
(tests/test_step.py). Anything this does not cover falls back to `optimizer.step()`.
"""

from __future__ import annotations

import torch


class FusedAdamStep:
    """`step()` for a torch.optim.Adam/AdamW built with fused=True; create it after any
    `load_state_dict` (it holds the state tensors). What it covers is checked when it is made
    (`supported`); hooks registered on the optimizer later are not seen."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.groups = [self._group_tensors(g) for g in optimizer.param_groups] if supported(optimizer) else None

    def _group_tensors(self, group: dict) -> tuple[list, list, list, list]:
        params, exp_avgs, exp_avg_sqs, steps = [], [], [], []
        for p in group["params"]:
            state = self.optimizer.state[p]
            if not state:  # as Adam's _init_group makes it for a fused optimizer
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        return params, exp_avgs, exp_avg_sqs, steps

    def __call__(self) -> None:
        if self.groups is None or any(p.grad is None for g in self.groups for p in g[0]):
            self.optimizer.step()
            return
        for group, (params, exp_avgs, exp_avg_sqs, steps) in zip(self.optimizer.param_groups, self.groups):
            beta1, beta2 = group["betas"]
            kernel = torch._fused_adamw_ if group.get("decoupled_weight_decay") else torch._fused_adam_
            torch._foreach_add_(steps, 1)
            kernel(params, [p.grad for p in params], exp_avgs, exp_avg_sqs, [], steps, lr=group["lr"],
                   beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"],
                   amsgrad=False, maximize=group["maximize"], grad_scale=None, found_inf=None)
        # The LR schedulers check that the optimizer stepped before them (their wrapper of
        # optimizer.step sets this flag, which a direct kernel call does not pass through).
        self.optimizer._opt_called = True


def supported(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the direct call computes what optimizer.step() would: fused Adam/AdamW, float32
    parameters on one device per group, no amsgrad, no tensor lr, no step hooks, nothing differentiable or capturable."""
    from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

    hooks = (optimizer._optimizer_step_pre_hooks, optimizer._optimizer_step_post_hooks,
             _global_optimizer_pre_hooks, _global_optimizer_post_hooks)
    if not isinstance(optimizer, torch.optim.Adam) or any(hooks):
        return False
    for g in optimizer.param_groups:
        if not g.get("fused") or g["amsgrad"] or g["differentiable"] or g["capturable"] or isinstance(g["lr"], torch.Tensor):
            return False
        if len({p.device for p in g["params"]}) != 1 or any(p.dtype != torch.float32 for p in g["params"]):
            return False
    return True

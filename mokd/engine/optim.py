"""Optimisers of the students: parameter groups without decay on biases and norms, LARS, clipping."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import torch
import torch.distributed as dist
from torch import nn

from mokd.config import register_choices
from mokd.registry import Registry

MODEL_SCHEDULE, THEAD_SCHEDULE = "model", "thead"


def parameter_groups(model: nn.Module, thead_schedule: bool = False) -> list[dict]:
    """Weights (decayed) and biases / norm parameters / 1-d tensors (never decayed), each split into the heads'
    last layers and the rest (the last layers are frozen early on; see set_schedule). Each group names the
    schedule it follows: the model's own, or with `thead_schedule` the T-Head's own group (the official CNN
    T-Head group: the ViT's lr and weight decay, applied to every one of its parameters). Empty groups are left
    out."""
    last_layer_ids = {id(p) for layer in getattr(model, "last_layers", lambda: [])() for p in layer.parameters()}
    thead = getattr(model, "thead", None)
    thead_ids = {id(p) for p in thead.parameters()} if thead_schedule and thead is not None else set()
    groups: dict[tuple[str, bool, bool], list] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        schedule = THEAD_SCHEDULE if id(parameter) in thead_ids else MODEL_SCHEDULE
        decay = schedule == THEAD_SCHEDULE or not (parameter.ndim <= 1 or name.endswith(".bias"))
        groups.setdefault((schedule, decay, id(parameter) in last_layer_ids), []).append(parameter)
    return [{"params": params, "schedule": schedule, "apply_weight_decay": decay, "last_layer": last}
            for (schedule, decay, last), params in sorted(groups.items(), key=lambda item: item[0])]


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratio (You et al.); biases and norms skip both decay and LARS."""

    def __init__(self, params: Iterable, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001) -> None:
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102
        for group in self.param_groups:
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                update = parameter.grad
                if parameter.ndim > 1:
                    update = update.add(parameter, alpha=group["weight_decay"])
                    weight_norm, update_norm = torch.norm(parameter), torch.norm(update)
                    ratio = torch.where((weight_norm > 0) & (update_norm > 0),
                                        group["trust_coefficient"] * weight_norm / update_norm,
                                        torch.ones_like(weight_norm))
                    update = update * ratio
                state = self.state[parameter]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(parameter)
                buffer = state["momentum_buffer"].mul_(group["momentum"]).add_(update)
                parameter.add_(buffer, alpha=-group["lr"])


IMPLEMENTATIONS = {"loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}

# modelN.optim.name: each name builds the optimiser from (parameter groups, optim section, implementation flags).
OPTIMIZERS: Registry[Callable[[list, Any, dict], torch.optim.Optimizer]] = Registry("modelN.optim.name")
register_choices(OPTIMIZERS.key, OPTIMIZERS.helps)


@OPTIMIZERS.register("sgd", "SGD with momentum (optim.momentum)")
def _sgd(groups: list, optim_config, flavour: dict) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=0.0, momentum=optim_config.momentum, weight_decay=0.0, **flavour)


@OPTIMIZERS.register("lars", "SGD with momentum and a layer-wise trust ratio (You et al.); biases and norms skip "
                             "it; its own per-tensor step, not under deepspeed")
def _lars(groups: list, optim_config, flavour: dict) -> torch.optim.Optimizer:
    return LARS(groups, momentum=optim_config.momentum)


@OPTIMIZERS.register("adamw", "AdamW (decoupled weight decay)")
def _adamw(groups: list, optim_config, flavour: dict) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=0.0, weight_decay=0.0, **flavour)


def build_optimizer(model: nn.Module, optim_config, implementation: str = "foreach",
                    thead_schedule: bool = False) -> torch.optim.Optimizer:
    """The student's optimiser; `implementation` (perf.optimizer) picks torch's per-tensor loop, multi-tensor
    (foreach) or single-kernel (fused) update for sgd and adamw. LARS has its own per-tensor step.
    `thead_schedule`: the T-Head is its own parameter group with its own schedules (see parameter_groups)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"optimiser implementation {implementation!r} is not one of {', '.join(IMPLEMENTATIONS)}")
    build = OPTIMIZERS.get(optim_config.name)
    # lr and weight decay are set by the schedules before every step.
    return build(parameter_groups(model, thead_schedule), optim_config, IMPLEMENTATIONS[implementation])


GroupValues = Mapping[str, tuple[float, float]]  # schedule name -> (lr, weight decay) at this step


def set_schedule(optimizer: torch.optim.Optimizer, values: GroupValues, freeze_last_layer: bool = False) -> None:
    """This step's lr and weight decay on every group, from the schedule the group follows; with
    freeze_last_layer, the last-layer groups get neither (used where gradients cannot be dropped per parameter,
    i.e. under ZeRO)."""
    for group in optimizer.param_groups:
        lr, weight_decay = values[group["schedule"]]
        frozen = freeze_last_layer and group["last_layer"]
        group["lr"] = 0.0 if frozen else lr
        group["weight_decay"] = weight_decay if group["apply_weight_decay"] and not frozen else 0.0


@torch.no_grad()
def clip_gradients_(model: nn.Module, max_norm: float, sharded: bool = False) -> torch.Tensor:
    """DINO's clipping: every parameter's gradient scaled on its own to norm at most `max_norm` (0: no clipping);
    returns the total norm before clipping. `sharded`: the gradients are FSDP2 DTensors; each parameter's norm is
    then that of its whole gradient (its local shards' squared norms summed over the ranks in one all-reduce), so
    every rank scales its shards by the same factor as one process would scale the whole gradient."""
    grads = [p.grad.to_local() if sharded else p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros((), device=next(model.parameters()).device)
    norms = torch.stack(torch._foreach_norm(grads)).float()
    if sharded:
        squares = norms.pow(2)
        dist.all_reduce(squares)
        norms = squares.sqrt()
    if max_norm > 0:
        scales = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, list(scales.to(grads[0].dtype).unbind()))
    return norms.norm()


def drop_last_layer_gradients_(last_layers: list[nn.Module]) -> None:
    """Freeze the heads' output layers (first epoch): their gradients are discarded before the step."""
    for layer in last_layers:
        for parameter in layer.parameters():
            parameter.grad = None

"""Optimizers and learning-rate schedules by the names the tab shows."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch

from ..errors import UserError

log = logging.getLogger(__name__)

EIGHT_BIT = ("AdamW8bit", "Lion8bit")

# Weights per foreach call of ForeachLion. On a CPU each _foreach_* op runs its tensors one after another, so
# one call over a whole LoRA streams every tensor through memory once per op: at SD1.5's shapes (384 tensors)
# that was 2.4x slower than lion-pytorch's per-tensor loop at rank 128, while chunks of about 64 K weights
# (about 1 MiB of weights, gradients, states and updates: they stay in cache from op to op) beat it at every
# rank (median step, one thread, 2-core AMD EPYC: 5.8 -> 3.2 ms at rank 4, 12.0 -> 9.5 ms at rank 32,
# 33.7 -> 27.8 ms at rank 128). On a GPU the chunk only bounds the temporary update tensor (64 MiB in fp32)
# while keeping the launches few.
FOREACH_CHUNK = {"cpu": 1 << 16}
FOREACH_CHUNK_OTHER = 1 << 24
# A tensor above this many weights (a flat LoRA, see flat_params.py) is updated in pieces of this size. On a
# CPU one op over a piece this large runs on every thread; smaller pieces pay that start-up per op, larger
# ones fall out of the cache between ops (flat SD1.5 LoRA at rank 32, 13.6 M weights, cold caches, 2-core AMD
# EPYC: 12.2 ms in pieces of 64 K, 6.9 ms of 256 K, 5.6 ms of 1 M, 20.4 ms whole; 16.3 ms as 384 tensors).
SPLIT_ABOVE = {"cpu": 1 << 20}


class ForeachLion(torch.optim.Optimizer):
    """Lion (Chen et al., 2023) with exactly lion-pytorch's update, but over many tensors per call.

    Why this exists: lion-pytorch's ``Lion`` (0.2.x) steps the parameters one by one in Python and has no
    multi-tensor path (its only alternative is a per-tensor Triton kernel). A LoRA has hundreds of small
    tensors (384+ on SD1.5), so that loop costs a few kernel launches per tensor on a GPU and most of the
    trainer's overhead on a CPU. Here each step is a handful of ``torch._foreach_*`` calls per chunk of
    tensors of one device and dtype (see FOREACH_CHUNK for the chunk size).

    Kept identical to ``lion_pytorch.Lion`` so the two are interchangeable, a saved optimizer state included:
    the same constructor arguments, the same ``param_groups`` keys (``lr``, ``betas``, ``weight_decay``), the
    same per-parameter state (``exp_avg`` alone, created as zeros on the first step that has a gradient), and
    the same update, in the same order of operations::

        p       *= 1 - lr * wd                       # weight decay, scaled by lr (or wd / initial lr)
        p       -= lr * sign(beta1 * exp_avg + (1 - beta1) * grad)
        exp_avg  = beta2 * exp_avg + (1 - beta2) * grad
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
    ) -> None:
        if not lr > 0.0:
            raise ValueError(f"Lion's learning rate must be above 0, not {lr}.")
        if not all(0.0 <= beta <= 1.0 for beta in betas):
            raise ValueError(f"Lion's betas must lie in [0, 1], not {betas}.")
        # Same attributes as lion_pytorch.Lion: decoupled weight decay divides by the lr given here.
        self._init_lr = lr
        self.decoupled_wd = decoupled_weight_decay
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Update every parameter that has a gradient; returns the closure's loss, if a closure is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _step_group(self, group: dict[str, Any]) -> None:
        lr = float(group["lr"])
        beta1, beta2 = group["betas"]
        wd = group["weight_decay"]
        if self.decoupled_wd:
            wd /= self._init_lr
        for (device, _), tensors in self._by_device_and_dtype(group).items():
            limit = FOREACH_CHUNK.get(device.type, FOREACH_CHUNK_OTHER)
            params, grads, exp_avgs = _split_large(*tensors, limit=SPLIT_ABOVE.get(device.type, limit))
            for chunk in _chunks([p.numel() for p in params], limit):
                _lion_foreach(params[chunk], grads[chunk], exp_avgs[chunk], lr=lr, wd=wd, beta1=beta1, beta2=beta2)

    def _by_device_and_dtype(
        self, group: dict[str, Any]
    ) -> dict[tuple[torch.device, torch.dtype], tuple[list, list, list]]:
        """Parameters with a gradient, with their gradients and states, split so that each foreach call gets
        tensors of one device and dtype (the condition of torch's fast multi-tensor kernels)."""
        buckets: dict[tuple[torch.device, torch.dtype], tuple[list, list, list]] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("Lion does not support sparse gradients.")
            state = self.state[p]
            if len(state) == 0:
                state["exp_avg"] = torch.zeros_like(p)
            params, grads, exp_avgs = buckets.setdefault((p.device, p.dtype), ([], [], []))
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
        return buckets


def _split_large(*lists: list[torch.Tensor], limit: int) -> tuple[list[torch.Tensor], ...]:
    """The parallel lists (weights, gradients, states: one shape per position) with every position whose
    tensors hold more than ``limit`` values cut into flat views of at most ``limit`` values, so that a flat
    LoRA (see flat_params.py) is also updated in cache-sized chunks. Updating the views updates the tensors."""
    if all(t.numel() <= limit for t in lists[0]):
        return lists
    out: tuple[list[torch.Tensor], ...] = tuple([] for _ in lists)
    for same in zip(*lists, strict=False):
        if same[0].numel() <= limit or not all(t.is_contiguous() for t in same):
            for kept, t in zip(out, same, strict=False):
                kept.append(t)
        else:
            for kept, t in zip(out, same, strict=False):
                kept.extend(t.view(-1).split(limit))
    return out


def _chunks(sizes: list[int], limit: int) -> list[slice]:
    """Consecutive slices of ``sizes`` whose sums reach ``limit`` at most by their last item."""
    slices, start, total = [], 0, 0
    for i, size in enumerate(sizes):
        total += size
        if total >= limit:
            slices.append(slice(start, i + 1))
            start, total = i + 1, 0
    if start < len(sizes):
        slices.append(slice(start, len(sizes)))
    return slices


def _lion_foreach(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    *,
    lr: float,
    wd: float,
    beta1: float,
    beta2: float,
) -> None:
    """One Lion step over lists of same-device, same-dtype tensors (lion_pytorch's update_fn, batched)."""
    if wd != 0.0:  # lion-pytorch multiplies by 1.0 when wd is 0: the same values, one pass fewer
        torch._foreach_mul_(params, 1.0 - lr * wd)
    updates = torch._foreach_mul(exp_avgs, beta1)
    torch._foreach_add_(updates, grads, alpha=1.0 - beta1)
    if updates[0].is_complex():  # one dtype per call
        for u in updates:  # sgn (z / |z|) is what lion-pytorch takes; it has no foreach form
            u.sgn_()
    else:
        torch._foreach_sign_(updates)
    torch._foreach_add_(params, updates, alpha=-lr)
    torch._foreach_mul_(exp_avgs, beta2)
    torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta2)


def _torch_fast_path(
    cls: type[torch.optim.AdamW] | type[torch.optim.SGD],
    groups: list[dict[str, Any]],
    device: torch.device,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """torch's AdamW or SGD on its fastest path: the fused kernel (one kernel per tensor, every op of the
    update in one pass) where this torch has one for the device, else the foreach path on a GPU.

    The fused kernels run on CUDA and, since torch 2.4, on a CPU too, where they are also by far the
    fastest: at SD1.5's LoRA shapes (384 tensors, rank 32, one thread, 2-core AMD EPYC) AdamW took 6.9 ms
    fused, 19.4 ms per tensor and 37.8 ms foreach; SGD with Nesterov momentum 4.4, 8.2 and 9.2 ms. foreach
    loses on a CPU at rank 32 and above (each of its ops streams every tensor through memory), so an older
    torch without the fused CPU kernel keeps its per-tensor loop there.
    """
    try:
        return cls(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError) as exc:  # no fused kernel for this device (RuntimeError) or class (older SGD)
        log.debug(
            "%s has no fused kernel for %s in torch %s (%s); using %s.",
            cls.__name__,
            device.type,
            torch.__version__,
            exc,
            "its per-tensor loop" if device.type == "cpu" else "foreach",
        )
    return cls(groups, foreach=device.type != "cpu", **kwargs)


@functools.cache
def _bnb_failure(name: str, device_type: str) -> str | None:
    """Why bitsandbytes' ``name`` cannot step on ``device_type`` here (None when it can).

    bitsandbytes ran its 8-bit optimizers on CUDA only before its multi-backend releases; newer ones also run
    on a CPU. Rather than guess from version numbers, one step on a tensor big enough to take the 8-bit path
    (4096 values, bitsandbytes' default threshold) says whether the installed version runs here.
    """
    import bitsandbytes as bnb

    cls = bnb.optim.AdamW8bit if name == "AdamW8bit" else bnb.optim.Lion8bit
    probe = torch.nn.Parameter(torch.zeros(4096, device=device_type))
    probe.grad = torch.ones_like(probe)
    try:
        cls([probe], lr=1e-3).step()
    except Exception as exc:  # noqa: BLE001 - a missing backend surfaces as any of several exception types
        return f"{type(exc).__name__}: {exc}"
    return None


def _make_8bit(
    name: str, groups: list[dict[str, Any]], lr: float, device: torch.device, args: dict[str, Any]
) -> torch.optim.Optimizer:
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise UserError(
            f"The {name} optimizer needs bitsandbytes, which is not installed here (Train Tools does "
            "not add it to a WebUI): choose AdamW or Lion, or run 'pip install bitsandbytes' with "
            "this Python."
        ) from exc
    if device.type != "cuda":
        failure = _bnb_failure(name, device.type)
        if failure is not None:
            log.info(
                "bitsandbytes %s does not run %s on %s: %s",
                getattr(bnb, "__version__", "?"),
                name,
                device.type,
                failure,
            )
            raise UserError(
                f"The {name} optimizer needs a CUDA GPU with this bitsandbytes version; choose AdamW "
                "or Lion to train on this device."
            )
    cls = bnb.optim.AdamW8bit if name == "AdamW8bit" else bnb.optim.Lion8bit
    return cls(groups, lr=lr, **args)


# The arguments each optimizer is built with besides the learning rate: one table for building it and for
# the file's ``ss_optimizer`` (``describe_optimizer``).
OPTIMIZER_ARGS: dict[str, dict[str, Any]] = {
    "AdamW": {"weight_decay": 1e-2},
    "SGDNesterov": {"momentum": 0.9, "nesterov": True},
    "Lion": {"weight_decay": 0.0},
    "Prodigy": {"weight_decay": 0.0},
    "AdaFactor": {"relative_step": False, "scale_parameter": False, "warmup_init": False},
    "AdamW8bit": {},
    "Lion8bit": {},
}


def optimizer_kwargs(name: str, given: str = "") -> dict[str, Any]:
    """What ``name`` is built with besides the learning rate: ``OPTIMIZER_ARGS``' defaults, with the setting
    ``optimizer_args`` (``given``, checked by ``config_values.optimizer_arguments``) over them."""
    from ..config_values import optimizer_arguments

    if name not in OPTIMIZER_ARGS:
        raise UserError(f"Unknown optimizer '{name}'.")
    return {**OPTIMIZER_ARGS[name], **optimizer_arguments(given, name)}


def make_optimizer(
    name: str, param_groups: Iterable[dict[str, Any]], lr: float, *, device: torch.device, given: str = ""
) -> torch.optim.Optimizer:
    """Build the named optimizer over ``param_groups`` (each may carry its own ``lr``), on the fastest path
    the optimizer has for ``device`` (fused or multi-tensor), with the arguments ``given`` (the setting
    ``optimizer_args``) over its defaults."""
    groups = list(param_groups)
    args = optimizer_kwargs(name, given)
    if name == "AdamW":
        return _torch_fast_path(torch.optim.AdamW, groups, device, lr=lr, **args)
    if name == "SGDNesterov":
        return _torch_fast_path(torch.optim.SGD, groups, device, lr=lr, **args)
    if name == "Lion":
        return ForeachLion(groups, lr=lr, **args)
    if name == "Prodigy":
        from prodigyopt import Prodigy

        if len({g.get("lr", lr) for g in groups} - {0.0}) > 1:
            raise UserError(
                "Prodigy takes one learning rate for all weights; set the UNet and text encoder "
                "learning rates to 0 (the learning rate is then used for both) or choose another "
                "optimizer."
            )
        if lr < 0.1:
            log.warning("Prodigy finds its own step size and expects a learning rate near 1.0; %g was given.", lr)
        return Prodigy(groups, lr=lr, **args)
    if name == "AdaFactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=lr, **args)
    return _make_8bit(name, groups, lr, device, args)


def describe_optimizer(name: str, optimizer: torch.optim.Optimizer, given: str = "") -> str:
    """What the file's ``ss_optimizer`` says, in kohya's form: the class that stepped (module and name) and the
    arguments it was given besides the learning rate, e.g. ``bitsandbytes.optim.adamw.AdamW8bit`` or
    ``torch.optim.adamw.AdamW(weight_decay=0.01)``. ``optimizer`` may be accelerate's wrapper."""
    inner = getattr(optimizer, "optimizer", optimizer)
    cls = type(inner)
    args = ",".join(f"{key}={value}" for key, value in optimizer_kwargs(name, given).items())
    return f"{cls.__module__}.{cls.__name__}" + (f"({args})" if args else "")


def make_lr_scheduler(
    name: str, optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """The named diffusers schedule (the names kohya's scripts and the tab use) over ``total_steps``."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        name, optimizer=optimizer, num_warmup_steps=warmup_steps, num_training_steps=max(total_steps, 1)
    )

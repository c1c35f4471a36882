"""The optimizers of the tab (issue 6): the multi-tensor Lion steps exactly as lion-pytorch's Lion and shares its
saved state, and every optimizer name builds and trains on a CPU on its fastest path."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from lion_pytorch import Lion

from train_tools.config import OPTIMIZERS, TrainConfig
from train_tools.config_values import optimizer_arguments
from train_tools.errors import UserError
from train_tools.training import optim
from train_tools.training.optim import (
    EIGHT_BIT,
    ForeachLion,
    describe_optimizer,
    make_lr_scheduler,
    make_optimizer,
)

SHAPES = [(7,), (4, 5), (3, 2, 3, 3), (1,), (6, 1)]


def make_params(seed: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]


def two_groups(params: list[torch.nn.Parameter]) -> list[dict]:
    """Two groups with their own learning rates, as the trainer passes UNet and text-encoder LoRA."""
    return [{"params": params[:3], "lr": 3e-3}, {"params": params[3:], "lr": 7e-4}]


def set_grads(params: list[torch.nn.Parameter], step: int, skip: int | None = None) -> None:
    """The same pseudo-random gradients for both optimizers' copies; ``skip`` leaves one without a gradient."""
    gen = torch.Generator().manual_seed(1000 + step)
    for i, p in enumerate(params):
        grad = torch.randn(p.shape, generator=gen)
        p.grad = None if i == skip else grad


def run_steps(
    opts: list[torch.optim.Optimizer],
    param_sets: list[list[torch.nn.Parameter]],
    steps: range,
    skip_at: Callable[[int], int | None] = lambda _: None,
) -> None:
    for step in steps:
        for opt, params in zip(opts, param_sets, strict=False):
            set_grads(params, step, skip=skip_at(step))
            opt.step()


def assert_same(
    a: list[torch.nn.Parameter], b: list[torch.nn.Parameter], opt_a: torch.optim.Optimizer, opt_b: torch.optim.Optimizer
) -> None:
    for pa, pb in zip(a, b, strict=False):
        torch.testing.assert_close(pa.detach(), pb.detach())
        assert opt_a.state[pa].keys() == opt_b.state[pb].keys()
        if opt_a.state[pa]:
            torch.testing.assert_close(opt_a.state[pa]["exp_avg"], opt_b.state[pb]["exp_avg"])


@pytest.mark.parametrize("chunk", [None, 10])
@pytest.mark.parametrize("weight_decay, decoupled", [(0.0, False), (0.1, False), (1e-4, True)])
def test_foreach_lion_matches_lion_pytorch_step_for_step(
    weight_decay: float, decoupled: bool, chunk: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if chunk is not None:  # several foreach calls per group (a chunk ends once it holds 10 weights or more)
        monkeypatch.setitem(optim.FOREACH_CHUNK, "cpu", chunk)
    ref_params, our_params = make_params(0), make_params(0)
    ref = Lion(
        two_groups(ref_params), lr=1e-3, betas=(0.9, 0.99), weight_decay=weight_decay, decoupled_weight_decay=decoupled
    )
    ours = ForeachLion(
        two_groups(our_params), lr=1e-3, betas=(0.9, 0.99), weight_decay=weight_decay, decoupled_weight_decay=decoupled
    )
    start = [p.detach().clone() for p in our_params]
    # param 4 has no gradient on the first two steps: no state, no change, as in lion-pytorch
    run_steps([ref, ours], [ref_params, our_params], range(2), skip_at=lambda _: 4)
    assert not ours.state[our_params[4]] and torch.equal(our_params[4].detach(), start[4])
    assert_same(ref_params, our_params, ref, ours)
    for opt in (ref, ours):  # a schedule changing the learning rates between steps
        opt.param_groups[0]["lr"] *= 0.5
        opt.param_groups[1]["lr"] *= 2.0
    run_steps([ref, ours], [ref_params, our_params], range(2, 6), skip_at=lambda s: 1 if s == 3 else None)
    assert_same(ref_params, our_params, ref, ours)
    for p, p0 in zip(our_params, start, strict=False):
        assert not torch.equal(p.detach(), p0)


def test_chunks_cover_every_tensor_once_in_order() -> None:
    sizes = [7, 20, 6, 1, 9, 3, 12]
    chunks = optim._chunks(sizes, 10)
    assert [i for c in chunks for i in range(len(sizes))[c]] == list(range(len(sizes)))
    assert all(sum(sizes[c][:-1]) < 10 for c in chunks)  # each chunk closes at the item that reaches the limit
    assert len(chunks) == 3 and optim._chunks([], 10) == [] and len(optim._chunks(sizes, 1 << 16)) == 1


def test_foreach_lion_groups_devices_and_dtypes() -> None:
    """Mixed dtypes go to separate foreach calls and each matches lion-pytorch in its own dtype."""
    gen = torch.Generator().manual_seed(3)
    base = [torch.randn(5, 4, generator=gen), torch.randn(3, generator=gen), torch.randn(2, 2, generator=gen)]
    dtypes = [torch.float32, torch.float64, torch.float32]
    ref_params = [torch.nn.Parameter(t.to(d)) for t, d in zip(base, dtypes, strict=False)]
    our_params = [torch.nn.Parameter(t.to(d)) for t, d in zip(base, dtypes, strict=False)]
    ref, ours = Lion(ref_params, lr=1e-2, weight_decay=0.05), ForeachLion(our_params, lr=1e-2, weight_decay=0.05)
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        grads = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in ref_params]
        for params, opt in ((ref_params, ref), (our_params, ours)):
            for p, grad in zip(params, grads, strict=False):
                p.grad = grad.clone()
            opt.step()
    assert_same(ref_params, our_params, ref, ours)
    assert [ours.state[p]["exp_avg"].dtype for p in our_params] == dtypes


@pytest.mark.parametrize("source_cls, target_cls", [(Lion, ForeachLion), (ForeachLion, Lion)])
def test_lion_state_dict_round_trips(source_cls: type, target_cls: type) -> None:
    """A state saved by either Lion loads in the other and the run goes on identically."""
    src_params = make_params(1)
    src = source_cls(two_groups(src_params), lr=1e-3, weight_decay=0.01)
    run_steps([src], [src_params], range(3), skip_at=lambda _: 2)
    saved = copy.deepcopy(src.state_dict())

    dst_params = [torch.nn.Parameter(p.detach().clone()) for p in src_params]
    dst = target_cls(two_groups(dst_params), lr=5.0, weight_decay=0.0)  # overwritten by the loaded groups
    dst.load_state_dict(saved)
    assert [g["lr"] for g in dst.param_groups] == [3e-3, 7e-4]
    assert all(g["weight_decay"] == 0.01 for g in dst.param_groups)
    assert sorted(dst.state_dict()["param_groups"][0]) == sorted(saved["param_groups"][0])
    assert not dst.state[dst_params[2]]  # never had a gradient: no state on either side

    run_steps([src, dst], [src_params, dst_params], range(3, 7))
    assert_same(src_params, dst_params, src, dst)
    # and back: the continued run's state has the layout of the other class
    again = source_cls(two_groups([torch.nn.Parameter(p.detach().clone()) for p in dst_params]), lr=1.0)
    again.load_state_dict(dst.state_dict())
    state = again.state_dict()["state"]
    assert state.keys() == dst.state_dict()["state"].keys() == {0, 1, 2, 3, 4}
    assert all(entry.keys() == {"exp_avg"} for entry in state.values())


def test_make_optimizer_uses_the_fast_paths() -> None:
    cpu = torch.device("cpu")
    params = [torch.nn.Parameter(torch.zeros(3))]
    lion = make_optimizer("Lion", [{"params": params}], 1e-4, device=cpu)
    assert type(lion) is ForeachLion and lion.defaults["weight_decay"] == 0.0
    adamw = make_optimizer("AdamW", [{"params": params}], 1e-4, device=cpu)
    sgd = make_optimizer("SGDNesterov", [{"params": params}], 1e-4, device=cpu)
    assert sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.9 and adamw.defaults["weight_decay"] == 1e-2
    # torch >= 2.4 has fused CPU kernels for both; before, the per-tensor loop (faster than foreach on a CPU)
    fused_on_cpu = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 4)
    for opt in (adamw, sgd):
        assert bool(opt.defaults["fused"]) == fused_on_cpu
        assert not opt.defaults["foreach"]


class NoFusedAdamW(torch.optim.AdamW):
    """An AdamW as torch versions without a fused kernel for the device answer fused=True."""

    def __init__(self, params: list, fused: bool | None = None, **kwargs: object) -> None:
        if fused:
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")
        super().__init__(params, **kwargs)


@pytest.mark.parametrize("device, foreach", [("cpu", False), ("cuda", True)])
def test_without_a_fused_kernel_foreach_on_gpus_only(device: str, foreach: bool) -> None:
    params = [torch.nn.Parameter(torch.zeros(3))]
    opt = optim._torch_fast_path(NoFusedAdamW, [{"params": params}], torch.device(device), lr=1e-3)
    assert type(opt) is NoFusedAdamW and opt.defaults["foreach"] is foreach and not opt.defaults["fused"]


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_builds_and_trains_on_cpu(name: str) -> None:
    """Each name of the tab builds on a CPU and lowers a simple loss (0.5 * |w - target|^2) in a few steps."""
    gen = torch.Generator().manual_seed(7)
    # 4096 values: large enough for bitsandbytes' 8-bit state; a second, small group with its own lr
    big = torch.nn.Parameter(torch.randn(64, 64, generator=gen))
    small = torch.nn.Parameter(torch.randn(5, generator=gen))
    targets = [torch.randn(64, 64, generator=gen), torch.randn(5, generator=gen)]
    lr = 1.0 if name == "Prodigy" else 1e-2
    small_lr = lr if name == "Prodigy" else lr / 2  # Prodigy takes one learning rate for all groups
    try:
        opt = make_optimizer(
            name, [{"params": [big], "lr": lr}, {"params": [small], "lr": small_lr}], lr, device=torch.device("cpu")
        )
    except UserError as exc:
        if name in EIGHT_BIT:
            pytest.skip(f"the installed bitsandbytes has no CPU support for {name}: {exc}")
        raise
    sched = make_lr_scheduler("constant_with_warmup", opt, warmup_steps=2, total_steps=10)

    @torch.no_grad()
    def value() -> float:
        return float(loss())

    def loss() -> torch.Tensor:
        return sum(0.5 * ((p - t) ** 2).sum() for p, t in zip((big, small), targets, strict=False))

    start = value()
    before = [big.detach().clone(), small.detach().clone()]
    for _ in range(5):
        opt.zero_grad(set_to_none=True)
        loss().backward()
        opt.step()
        sched.step()
    assert all(torch.isfinite(p).all() for p in (big, small))
    assert not torch.equal(big.detach(), before[0]) and not torch.equal(small.detach(), before[1])
    assert value() < start
    assert opt.state[big]  # it keeps a state per parameter (what resume saves)


def test_unknown_optimizer_is_a_user_error() -> None:
    with pytest.raises(UserError, match="Unknown optimizer"):
        make_optimizer("Adam", [{"params": [torch.nn.Parameter(torch.zeros(1))]}], 1e-3, device=torch.device("cpu"))


def test_prodigy_with_two_learning_rates_is_a_user_error() -> None:
    """Prodigy stops at its first step when groups have different learning rates: say so before training."""
    groups = [
        {"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 1.0},
        {"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 0.5},
    ]
    with pytest.raises(UserError, match="one learning rate"):
        make_optimizer("Prodigy", groups, 1.0, device=torch.device("cpu"))


@pytest.mark.parametrize(
    ("name", "given", "wanted"),
    [
        ("AdamW", "weight_decay=0.1 betas=0.8,0.95 eps=1e-6", {"weight_decay": 0.1, "betas": (0.8, 0.95), "eps": 1e-6}),
        ("AdamW", "", {"weight_decay": 1e-2, "betas": (0.9, 0.999)}),  # torch's betas, the tab's weight decay
        ("Lion", "weight_decay=0.3 betas=0.95,0.98", {"weight_decay": 0.3, "betas": (0.95, 0.98)}),
        ("SGDNesterov", "momentum=0.8 weight_decay=1e-4", {"momentum": 0.8, "weight_decay": 1e-4, "nesterov": True}),
        ("AdaFactor", "clip_threshold=2 decay_rate=-0.5", {"clip_threshold": 2, "decay_rate": -0.5}),
    ],
)
def test_optimizer_args_reach_the_optimizer(name: str, given: str, wanted: dict[str, Any]) -> None:
    """The setting ``optimizer_args`` (kohya's form) lands in the optimizer's groups and in ``ss_optimizer``."""
    param = torch.nn.Parameter(torch.zeros(4))
    opt = make_optimizer(name, [{"params": [param]}], 1e-3, device=torch.device("cpu"), given=given)
    group = opt.param_groups[0]
    assert {key: group[key] for key in wanted} == wanted
    described = describe_optimizer(name, opt, given)
    for key, value in optimizer_arguments(given, name).items():
        assert f"{key}={value}" in described


@pytest.mark.parametrize(
    ("given", "said"),
    [
        ("weight_decay", "as name=value"),
        ("weight_decy=0.1", "takes no argument 'weight_decy'; it takes weight_decay, betas, eps, amsgrad"),
        ("betas=0.9,high", "'betas' must be a number"),
        ("eps=nan", "finite number"),
        ("momentum=0.9", "takes no argument 'momentum'"),  # SGD's, not AdamW's
    ],
)
def test_bad_optimizer_args_are_refused_before_a_run(given: str, said: str) -> None:
    with pytest.raises(UserError, match=re.escape(said)):
        TrainConfig.from_dict({"optimizer": "AdamW", "optimizer_args": given})
    assert TrainConfig.from_dict({"optimizer": "SGDNesterov", "optimizer_args": "momentum=0.9"}).optimizer_args

"""Output comparisons shared by the pass manager, the tests and ``presso.testing``."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch


def rel_error(got: Sequence[torch.Tensor], ref: Sequence[torch.Tensor]) -> float:
    """Worst relative L2 error over outputs: ``||got - ref|| / ||ref||`` (0 when both are 0)."""
    worst = 0.0
    for g, r in zip(got, ref, strict=True):
        g, r = torch.as_tensor(g).double().cpu(), torch.as_tensor(r).double().cpu()
        denom = r.norm().item()
        num = (g - r).norm().item()
        worst = max(worst, num / denom if denom > 0 else num)
    return worst


def max_abs_error(got: Sequence[torch.Tensor], ref: Sequence[torch.Tensor]) -> float:
    return max(((torch.as_tensor(g).double().cpu() - torch.as_tensor(r).double().cpu()).abs().max().item()
                for g, r in zip(got, ref, strict=True)), default=0.0)


def non_finite(outputs: Sequence[torch.Tensor]) -> list[int]:
    """Indices of floating outputs that hold a NaN or an Inf."""
    return [i for i, t in enumerate(outputs) if t.is_floating_point() and not torch.isfinite(t).all()]


# relative size of the float noise that stands in for the rounding differences of two correct
# implementations (ONNX Runtime's kernels against torch's differ by about 1e-7 per op)
PERTURBATION = 1e-6
# how much further than that noise a backend may drift before it counts as wrong, and how many
# perturbations the floor is the largest of: on SmolLM2 with int8 activations, over 24 example
# inputs, one decode token's file-against-torch error reached 2.6x a single perturbation's floor
# (floors of one input spread 3x across seeds) and 1.7x the largest of three
FLOOR_FACTOR = 3.0
FLOOR_SEEDS = 3


@contextlib.contextmanager
def perturbed(modules, relative: float = PERTURBATION, seed: int = 0):
    """Inside the block, every floating output of ``modules`` gets relative noise of size
    ``relative`` (the yielded object's ``reset()`` restarts the noise stream).

    Two correct implementations differ by rounding at every op, so the noise goes in at every
    module, not only the first. A model with quantized activations is discontinuous: such
    noise flips rounding decisions throughout it and moves its outputs by what any second
    correct implementation would (several percent on SmolLM2 with int8 activations, 1e-6 in
    float32), so comparing a backend against this noise floor tells a wrong lowering from
    rounding.
    """
    state = {"generator": torch.Generator().manual_seed(seed)}

    def hook(_module, _args, out):
        if not isinstance(out, torch.Tensor) or not out.is_floating_point():
            return None
        noise = torch.randn(out.shape, generator=state["generator"], dtype=torch.float32).to(out)
        return out * (1 + relative * noise)

    def reset() -> None:
        state["generator"] = torch.Generator().manual_seed(seed)

    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        yield type("Perturbation", (), {"reset": staticmethod(reset)})
    finally:
        for h in handles:
            h.remove()


def noise_floors(modules, measure: Callable[[Callable[[], None]], dict[str, float]],
                 relative: float = PERTURBATION, seeds: int = FLOOR_SEEDS) -> dict[str, float]:
    """The largest error, by name, that ``measure(reset)`` reports over ``seeds`` perturbed runs
    of ``modules`` (``reset`` restarts the noise, for a run of several steps): one sample of a
    discontinuous model's noise is itself noisy."""
    worst: dict[str, float] = {}
    for seed in range(seeds):
        with perturbed(modules, relative, seed) as noise:
            for name, err in measure(noise.reset).items():
                worst[name] = max(err, worst.get(name, 0.0))
    return worst


def noise_floor(modules, measure: Callable[[], float], relative: float = PERTURBATION) -> float:
    """:func:`noise_floors` for one output: the largest ``measure()`` over the perturbed runs."""
    return noise_floors(modules, lambda _reset: {"": measure()}, relative)[""]


def modules_issuing_ops(root: torch.nn.Module, run) -> list[torch.nn.Module]:
    """The submodules of ``root`` that call torch functions themselves while ``run()`` runs
    (the innermost module active at each call), in call order: what :meth:`Graph.called_modules`
    reads off a trace, found by one eager run instead of a trace."""
    from torch.overrides import TorchFunctionMode

    stack: list[torch.nn.Module] = []
    issuing: dict[int, torch.nn.Module] = {}

    class _Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if stack and id(stack[-1]) not in issuing:
                issuing[id(stack[-1])] = stack[-1]
            return func(*args, **(kwargs or {}))

    def enter(module, _args):
        stack.append(module)

    def leave(_module, _args, _out):
        stack.pop()

    modules = [m for m in root.modules() if m is not root]
    handles = [h for m in modules for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    try:
        with _Record():
            run()
    finally:
        for h in handles:
            h.remove()
    return list(issuing.values())


def float_dtype(module: torch.nn.Module) -> torch.dtype:
    """The floating dtype holding most of ``module``'s parameters (float32 when it has none)."""
    sizes: dict[torch.dtype, int] = {}
    for t in (*module.parameters(), *module.buffers()):
        if t.is_floating_point():
            sizes[t.dtype] = sizes.get(t.dtype, 0) + t.numel()
    return max(sizes, key=sizes.get) if sizes else torch.float32


def rounding_noise(dtype: torch.dtype) -> float:
    """Relative size of rounding to ``dtype``: the standard deviation of a uniform error of half a
    unit in the last place. In half precision an exact rewrite moves outputs by about this much at
    every op; in float32 the backend noise ``PERTURBATION`` stands in."""
    if dtype in (torch.float32, torch.float64):
        return PERTURBATION
    return torch.finfo(dtype).eps / (2 * 3 ** 0.5)


def allowed_error(tolerance: float, floor: float) -> float:
    """The error a backend may show: ``tolerance``, or the noise floor times ``FLOOR_FACTOR``."""
    return max(tolerance, FLOOR_FACTOR * floor)

"""Guards that keep a broken state out of checkpoints and exports, and stop a run that diverges.

    check_gradients      each step, before the optimizer applies them: a NaN/Inf gradient or an overflowing norm
    check_state          before each checkpoint: every parameter, buffer and optimizer state finite
    DivergenceGuard      each step: a loss far above its running median
    diagnose_forward     when a forward pass fails: the first layer whose output is not finite

A failure found here is deterministic (a restart from the last checkpoint meets it again): the worker loop stops
every rank at the same step and returns instead of raising, so Ray does not retry it, and the driver fails the run
naming the term, the step and the last good checkpoint. (pipeline/model_files.py refuses to write a model holding
NaN/Inf, whatever wrote it.)
"""
from __future__ import annotations

import statistics
from collections import deque
from typing import TYPE_CHECKING, Iterable, Iterator, Mapping

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from pipeline.train.step import TrainParts


class TrainingHealthError(FloatingPointError):
    """Training reached a state that must not be kept or continued: `term` (a loss term, a gradient, a parameter,
    an optimizer state, a layer's output) at `step`."""

    stopped = "training stopped before applying this update"

    def __init__(self, term: str, step: int | None, problem: str, advice: str = ""):
        self.term, self.step = term, step
        where = f" at step {step}" if step is not None else ""
        super().__init__(f"{term} {problem}{where}; {self.stopped}{'. ' + advice if advice else ''}")


class NonFiniteGradientError(TrainingHealthError):
    """A gradient is NaN/Inf or the gradient norm overflows (without fp16 loss scaling, which skips such steps)."""


class NonFiniteStateError(TrainingHealthError):
    """A parameter, buffer or optimizer state holds NaN/Inf."""

    stopped = "training stopped before saving this checkpoint"


class NonFiniteActivationError(TrainingHealthError):
    """A layer's output is NaN/Inf: the forward pass cannot give a usable loss."""


class DivergenceError(TrainingHealthError):
    """A loss grew beyond train.divergence_factor times its running median."""

    stopped = "training stopped before the next step (no checkpoint of this step)"


ADVICE = "The weights diverged: lower train.lr or the loss weights (train.loss)"


def first_nonfinite(named: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first floating-point tensor holding NaN/Inf, or None (one device sync for all of them)."""
    names, finite = [], []
    for name, tensor in named:
        if tensor is not None and tensor.is_floating_point():
            names.append(name)
            finite.append(torch.isfinite(tensor.detach()).all())
    if not finite:
        return None
    finite = torch.stack(finite)
    return None if bool(finite.all()) else names[int((~finite).nonzero()[0])]


def check_gradients(module: nn.Module, label: str, step: int | None) -> None:
    """Before the optimizer step: every gradient finite and their global L2 norm too (it overflows first)."""
    named = [(f"gradient of {label}.{name}", p.grad) for name, p in module.named_parameters() if p.grad is not None]
    if not named:
        return
    norm = torch.nn.utils.get_total_norm([g for _, g in named], error_if_nonfinite=False)
    if bool(torch.isfinite(norm)):
        return
    bad = first_nonfinite(named)
    if bad:
        raise NonFiniteGradientError(bad, step, "holds NaN or Inf values", ADVICE)
    raise NonFiniteGradientError(f"gradient norm of {label}", step, f"overflows ({norm.item()})", ADVICE)


def named_state(parts: TrainParts) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every parameter and buffer of G and D and every tensor of their optimizers' states."""
    from pipeline.train.step import unwrap

    for label, module, optimizer in (("net", unwrap(parts.net), parts.opt_g),
                                     ("discriminator", unwrap(parts.discriminator), parts.opt_d)):
        yield from ((f"{label}.{name}", t) for name, t in module.state_dict(keep_vars=True).items())
        names = {id(p): name for name, p in module.named_parameters()}
        for param, state in optimizer.state.items():
            yield from ((f"optimizer state {key} of {label}.{names.get(id(param), '?')}", value)
                        for key, value in state.items() if isinstance(value, torch.Tensor))


def check_state(parts: TrainParts, step: int) -> None:
    """Before a checkpoint: NonFiniteStateError names the first non-finite parameter, buffer or optimizer state."""
    bad = first_nonfinite(named_state(parts))
    if bad:
        raise NonFiniteStateError(bad, step, "holds NaN or Inf values", ADVICE)


def diagnose_forward(net: nn.Module, *inputs: torch.Tensor, **kwargs: torch.Tensor) -> str | None:
    """Run the forward pass again without gradients; -> the name of the first module whose output is not finite,
    or None. Used only after a forward pass failed (e.g. NaN indices inside PatchMatch)."""
    found: list[str] = []

    class Found(Exception):
        pass

    def hook(name: str):
        def check(_module, _args, output):
            tensors = output if isinstance(output, (tuple, list)) else [output]
            if first_nonfinite((name, t) for t in tensors if isinstance(t, torch.Tensor)):
                found.append(name)
                raise Found
        return check

    handles = [m.register_forward_hook(hook(name)) for name, m in net.named_modules() if name]
    try:
        with torch.no_grad():
            net(*inputs, **kwargs)
    except Found:
        pass
    except Exception:  # noqa: BLE001 - it failed again before any non-finite output: no diagnosis
        pass
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else None


class DivergenceGuard:
    """Stops a run whose loss leaves its running median: after `warmup` steps, |loss| above `factor` x the median
    of |loss| over the last `window` steps (at least 1, so that losses near 0 never count as a jump).
    factor None: off. The losses are the ranks' means, so every rank decides alike."""

    def __init__(self, factor: float | None, warmup: int, window: int = 100):
        self.factor, self.warmup = factor, warmup
        self.history: dict[str, deque[float]] = {}
        self.window = window

    def check(self, losses: Mapping[str, float], step: int, terms: tuple[str, ...] = ("g/total", "d/total")) -> None:
        if self.factor is None:
            return
        for term in terms:
            if term not in losses:
                continue
            history = self.history.setdefault(term, deque(maxlen=self.window))
            value = abs(losses[term])
            if len(history) >= self.warmup:
                median = max(1.0, statistics.median(history))
                if value > self.factor * median:
                    raise DivergenceError(term, step, f"is {losses[term]:.4g}, {value / median:.3g} x its running "
                                          f"median {median:.4g} (train.divergence_factor {self.factor:g})", ADVICE)
            history.append(value)

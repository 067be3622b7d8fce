r"""SAM policies: which steps of a :class:`samfast.SAM` run the ascent, and how.

A policy is set on the optimizer (``SAM(..., policy=...)`` or ``opt.policy = ...``) and is
consulted once per step while ``opt.sam_enabled`` is True; with ``sam_enabled`` False every
step is a plain base step and the policy is not consulted. So a policy composes with
:class:`samfast.SwitchSchedule` (the paper's late switch, unchanged: it sets ``sam_enabled``
per epoch): ``Interval(4)`` with ``sam_start=150`` is SAM every fourth step of the last 50
epochs. Without a policy every enabled step is a SAM step.

Each step of a policy follows a *plan*:

=================  ===========  ==============================================================
plan               passes       what the optimizer does
=================  ===========  ==============================================================
``"sam"``          2            ascent to w + e, descent with the gradient there
``"base"``         1            the base optimizer's step with g (an "ERM"/SGD step)
``"decide"``       1 or 2       the first pass, then ``policy.decide(||g||^2)``: "sam" or "base"
``"looksam_full"`` 2            "sam", and store g_v (LookSAM)
``"looksam_reuse"`` 1           the base step with g + alpha ||g|| / ||g_v|| g_v (LookSAM)
=================  ===========  ==============================================================

The policies (t: the policy's own step count, from 0, over the steps where it was consulted;
it advances once per step, skipped steps included):

* :class:`Interval` ``(k)`` — SAM on steps with (t + 1) % k == 0, a base step otherwise
  (Composer's ``SAM(interval=k)``, ``composer/algorithms/sam/sam.py``).
* :class:`LookSAM` ``(k, alpha)`` — Liu et al., "Towards Efficient and Scalable
  Sharpness-Aware Minimization", CVPR 2022, Algorithm 1. On steps with t % k == 0 a full SAM
  step whose descent gradient g_s is also decomposed against the plain gradient g of its first
  pass: g_v = g_s - (g . g_s / ||g||^2) g, the component of g_s orthogonal to g, is stored.
  On the other steps one pass and the descent with g + alpha (||g|| / (||g_v|| + eps)) g_v.
  Dot products and norms are over the whole model (the paper's vectors); pytorch-optimizer's
  ``LookSAM`` takes them per parameter tensor instead (the paper's layer-wise variant), so the
  two differ when a model has more than one tensor. A gradient that is None is a zero vector
  here. g_v costs one more parameter-sized buffer; the stored g_v is valid from a completed
  full step until the next full step starts (a skipped or aborted full step drops it, as
  does ``add_param_group``; the reuse steps after that are plain base steps until the next
  full step; steps with ``sam_enabled`` False leave it as it is). ``eps`` > 0 keeps the coefficient finite when g_v = 0.
* :class:`RandomSwitch` ``(p, seed)`` — RST / SS-SAM, Zhao et al., "Randomized
  Sharpness-Aware Training for Boosting Computational Efficiency in Deep Learning", 2022:
  SAM with probability p(t), a base step otherwise. The draw of step t is a pure function of
  (seed, t) (a counter-based generator: the first 56 bits of SHA-256 of both), so its state is
  (seed, t), the decisions do not depend on anything else the program draws, and a resumed
  run draws exactly what the uninterrupted one did.
* :class:`AdaptiveSAM` ``(total_steps, delta, lambda1, lambda2)`` — AE-SAM, Jiang et al.,
  "An Adaptive Policy to Employ Sharpness-Aware Minimization", ICLR 2023: with s_t = ||g_t||^2
  of the first pass, mu_t = delta mu_{t-1} + (1 - delta) s_t,
  var_t = delta var_{t-1} + (1 - delta) (s_t - mu_t)^2 (mu and var start at 0), and
  c_t = lambda1 t / T + lambda2 (1 - t / T), SAM when s_t >= mu_t + c_t sqrt(var_t), else a
  base step. The decision needs s_t on the host: one scalar sync per step on CUDA. A
  non-finite s_t leaves mu and var as they are and the step is a base step (which a
  non-finite gradient skips).

A policy's ``state_dict()`` holds plain Python values only (it is saved inside the
optimizer's ``state_dict()["samfast"]["policy"]`` and loads with ``weights_only=True``): its
step count, its state and its constructor's arguments (``hparams``), which
``load_state_dict`` restores as ``torch.optim`` restores a checkpoint's lr, with a warning
naming each one that differs from the policy's own.
"""

from __future__ import annotations

import hashlib
import math
import numbers
import warnings
from typing import Any, Callable

SAM_STEP, BASE_STEP, DECIDE = "sam", "base", "decide"
LOOKSAM_FULL, LOOKSAM_REUSE = "looksam_full", "looksam_reuse"
PLANS = (SAM_STEP, BASE_STEP, DECIDE, LOOKSAM_FULL, LOOKSAM_REUSE)
TWO_PASS_PLANS = (SAM_STEP, LOOKSAM_FULL)


def _check_int(name: str, value: Any, minimum: int) -> int:
    # numbers.Integral: numpy's integers too (as torch.optim accepts them)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"Invalid {name}: {value!r} (must be an int >= {minimum})")
    return int(value)


def _check_real(name: str, value: Any, lo: float = -math.inf, hi: float = math.inf,
                open_lo: bool = False, open_hi: bool = False) -> float:
    if (isinstance(value, bool) or not isinstance(value, numbers.Real)
            or not math.isfinite(value)):
        raise ValueError(f"Invalid {name}: {value!r} (must be a finite real number)")
    if value < lo or value > hi or (open_lo and value == lo) or (open_hi and value == hi):
        lo_b, hi_b = "(" if open_lo else "[", ")" if open_hi else "]"
        bound = (f"{'>' if open_lo else '>='} {lo:g}" if hi == math.inf
                 else f"in {lo_b}{lo:g}, {hi:g}{hi_b}")
        raise ValueError(f"Invalid {name}: {value!r} (must be {bound})")
    return float(value)


class Policy:
    """Base class: a policy plans each step (:meth:`plan`), is told when the step was taken
    (:meth:`advance`) and checkpoints its state. Subclasses set ``name``."""

    name = "policy"
    # constructor arguments saved in state_dict() and restored by load_state_dict()
    HPARAMS: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.step = 0

    def hparams(self) -> dict[str, Any]:
        """The constructor arguments, as plain Python values (saved with the state)."""
        return {name: getattr(self, name) for name in self.HPARAMS}

    def plan(self) -> str:
        """The plan of the current step (one of :data:`PLANS`); the same until
        :meth:`advance`."""
        raise NotImplementedError

    def decide(self, grad_sq_norm: float) -> bool:
        """For the plan "decide": SAM (True) or a base step, given ||g||^2 of the first pass.
        Called at most once per step, before :meth:`advance`."""
        raise RuntimeError(f"{type(self).__name__} does not decide from the gradient norm")

    def advance(self) -> None:
        """The current step was taken (or skipped for a non-finite gradient)."""
        self.step += 1

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "step": self.step, "hparams": self.hparams()}

    def _load(self, state: dict[str, Any]) -> dict[str, Any]:
        """Checks ``state`` and returns the attributes it sets (nothing is changed yet)."""
        if not isinstance(state, dict) or state.get("name") != self.name:
            got = state.get("name") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"Invalid state_dict: the policy state is {got!r}, the optimizer's "
                             f"policy is {self.name!r}")
        step = state.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"Invalid state_dict: policy step {step!r}")
        values = {"step": step}
        saved = state.get("hparams")  # absent in checkpoints written before samfast saved it
        if saved is not None:
            if not isinstance(saved, dict) or set(saved) != set(self.HPARAMS):
                raise ValueError(f"Invalid state_dict: {type(self).__name__}'s hparams "
                                 f"{saved!r} (want the keys {', '.join(self.HPARAMS)})")
            try:
                checked = self._checked_hparams(saved)
            except (TypeError, ValueError) as e:
                raise ValueError(f"Invalid state_dict: {type(self).__name__}'s hparams: {e}") \
                    from None
            values.update(checked)
        return values

    def _checked_hparams(self, saved: dict[str, Any]) -> dict[str, Any]:
        """``saved`` checked as the constructor checks its arguments."""
        return type(self)(**saved).hparams()

    def check_state_dict(self, state: dict[str, Any]) -> None:
        """Raises ValueError if :meth:`load_state_dict` would refuse ``state``."""
        self._load(state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the step count and state, and the checkpoint's hyper-parameters (as
        ``torch.optim``'s ``load_state_dict`` restores the checkpoint's lr): those that differ
        from the policy's are named in a warning; set them on the policy after loading to
        change them."""
        values = self._load(state)
        hparams = {k: values.pop(k) for k in self.HPARAMS if k in values}
        own = self.hparams()
        changed = [f"{k}={v!r} (was {own[k]!r})" for k, v in hparams.items() if v != own[k]]
        if changed:
            warnings.warn(f"samfast: {type(self).__name__}.load_state_dict: the checkpoint's "
                          f"{', '.join(changed)}; the checkpoint's values are used, as "
                          "torch.optim's load_state_dict restores its lr", stacklevel=3)
        self._set_hparams(hparams)
        for key, value in values.items():
            setattr(self, key, value)

    def _set_hparams(self, hparams: dict[str, Any]) -> None:
        for key, value in hparams.items():
            setattr(self, key, value)

    def fraction(self) -> float | None:
        """The expected fraction of steps that run SAM, where the policy fixes it."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(step={self.step})"


class Interval(Policy):
    """SAM every ``k`` steps (on t = k-1, 2k-1, ...), a base step otherwise (Composer's
    ``interval``)."""

    name = "interval"
    HPARAMS = ("k",)

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = _check_int("k", k, 1)

    def plan(self) -> str:
        return SAM_STEP if (self.step + 1) % self.k == 0 else BASE_STEP

    def fraction(self) -> float:
        return 1.0 / self.k

    def __repr__(self) -> str:
        return f"Interval(k={self.k}, step={self.step})"


class LookSAM(Policy):
    """LookSAM (Liu et al., CVPR 2022): a full SAM step every ``k`` steps (t % k == 0) that
    stores g_v, the part of the SAM gradient orthogonal to the plain one; in between, one
    pass and the descent with g + alpha ||g|| / (||g_v|| + eps) g_v."""

    name = "looksam"
    HPARAMS = ("k", "alpha", "eps")

    def __init__(self, k: int = 5, alpha: float = 0.7, eps: float = 1e-12) -> None:
        super().__init__()
        self.k = _check_int("k", k, 1)
        self.alpha = _check_real("alpha", alpha, 0.0)
        # eps > 0: with ||g_v|| = 0 (rho = 0, or g_s parallel to g) the reuse coefficient
        # alpha ||g|| / (||g_v|| + eps) must stay finite, as alpha ||g|| / eps * 0 = 0
        self.eps = _check_real("eps", eps, 0.0, open_lo=True)

    def plan(self) -> str:
        return LOOKSAM_FULL if self.step % self.k == 0 else LOOKSAM_REUSE

    def fraction(self) -> float:
        return 1.0 / self.k

    def __repr__(self) -> str:
        return f"LookSAM(k={self.k}, alpha={self.alpha}, eps={self.eps}, step={self.step})"


def uniform(seed: int, step: int) -> float:
    """RandomSwitch's draw for ``step``: uniform in [0, 1) with 56 random bits, a pure
    function of (seed, step) (SHA-256 as a counter-based generator)."""
    digest = hashlib.sha256(b"samfast.RandomSwitch:%d:%d" % (seed, step)).digest()
    return int.from_bytes(digest[:7], "big") / float(1 << 56)


class RandomSwitch(Policy):
    """RST (Zhao et al., 2022): SAM with probability ``p(t)`` at step t, a base step
    otherwise. ``p``: a probability, or a function of the step; :meth:`linear` makes the
    linear schedule from ``p_start`` to ``p_end`` over ``total_steps``."""

    name = "random"
    # p is saved as a number, or as [p_start, p_end, total_steps] for linear(); a p given
    # as another function of the step is not saved (the constructed policy's is used)
    HPARAMS = ("p", "seed")

    def __init__(self, p: float | Callable[[int], float], seed: int = 0) -> None:
        super().__init__()
        if callable(p):
            self.p = p
            self.probability(0)  # a function that does not give a probability fails here
        else:
            prob = _check_real("p", p, 0.0, 1.0)
            self.p = lambda step: prob
            self._constant = prob
        self.seed = _check_int("seed", seed, 0)

    def hparams(self) -> dict[str, Any]:
        if hasattr(self, "_constant"):
            p = self._constant
        elif hasattr(self, "_schedule"):
            p = list(self._schedule)
        else:
            p = None
        return {"p": p, "seed": self.seed}

    def _checked_hparams(self, saved: dict[str, Any]) -> dict[str, Any]:
        p = saved["p"]
        if isinstance(p, list):
            if len(p) != 3:
                raise ValueError(f"p {p!r} (want [p_start, p_end, total_steps])")
            p = list(RandomSwitch.linear(*p)._schedule)
        elif p is not None:
            p = _check_real("p", p, 0.0, 1.0)
        checked = {"seed": _check_int("seed", saved["seed"], 0)}
        return checked if p is None else {**checked, "p": p}

    def _set_hparams(self, hparams: dict[str, Any]) -> None:
        self.seed = hparams.get("seed", self.seed)
        if "p" not in hparams:
            return
        fresh = (RandomSwitch.linear(*hparams["p"]) if isinstance(hparams["p"], list)
                 else RandomSwitch(hparams["p"]))
        self.__dict__.pop("_constant", None)
        self.__dict__.pop("_schedule", None)
        for key in ("p", "_constant", "_schedule"):
            if hasattr(fresh, key):
                setattr(self, key, getattr(fresh, key))

    @classmethod
    def linear(cls, p_start: float, p_end: float, total_steps: int,
               seed: int = 0) -> "RandomSwitch":
        """p(t) from ``p_start`` at t = 0 linearly to ``p_end`` at t = ``total_steps``, then
        ``p_end``."""
        a = _check_real("p_start", p_start, 0.0, 1.0)
        b = _check_real("p_end", p_end, 0.0, 1.0)
        total = _check_int("total_steps", total_steps, 1)
        policy = cls(lambda step: a + (b - a) * min(step, total) / total, seed)
        policy._schedule = (a, b, total)
        return policy

    def probability(self, step: int) -> float:
        p = self.p(step)
        if not (isinstance(p, numbers.Real) and not isinstance(p, bool) and 0.0 <= p <= 1.0):
            raise ValueError(f"Invalid p: p({step}) = {p!r} (must be a probability in [0, 1])")
        return float(p)

    def plan(self) -> str:
        return SAM_STEP if uniform(self.seed, self.step) < self.probability(self.step) \
            else BASE_STEP

    def fraction(self) -> float | None:
        if hasattr(self, "_constant"):
            return self._constant
        if hasattr(self, "_schedule"):
            return (self._schedule[0] + self._schedule[1]) / 2
        return None

    def _load(self, state: dict[str, Any]) -> dict[str, Any]:
        values = super()._load(state)
        if "hparams" in state:  # the seed is one of them
            return values
        seed = state.get("seed")  # a checkpoint written before hparams saved the seed alone
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"Invalid state_dict: RandomSwitch seed {seed!r}")
        return {**values, "seed": seed}

    def __repr__(self) -> str:
        return f"RandomSwitch(seed={self.seed}, step={self.step})"


class AdaptiveSAM(Policy):
    """AE-SAM (Jiang et al., ICLR 2023): SAM when the first pass's squared gradient norm is
    large against its running mean and variance (see the module docstring). ``total_steps``
    is T of the threshold's linear schedule c_t = lambda1 t / T + lambda2 (1 - t / T), from
    lambda2 at the start to lambda1 at T (and lambda1 after). Defaults: delta 0.9, lambda1 -1,
    lambda2 1: the threshold falls from mean + 1 std to mean - 1 std over training, so the
    fraction of SAM steps grows. A constant threshold c is lambda1 = lambda2 = c (for a
    normally distributed ||g||^2 a fraction 1 - Phi(c) of the steps runs SAM)."""

    name = "adaptive"
    HPARAMS = ("total_steps", "delta", "lambda1", "lambda2")

    def __init__(self, total_steps: int, delta: float = 0.9, lambda1: float = -1.0,
                 lambda2: float = 1.0) -> None:
        super().__init__()
        self.total_steps = _check_int("total_steps", total_steps, 1)
        self.delta = _check_real("delta", delta, 0.0, 1.0, open_lo=True, open_hi=True)
        self.lambda1 = _check_real("lambda1", lambda1)
        self.lambda2 = _check_real("lambda2", lambda2)
        self.mean = 0.0
        self.var = 0.0

    def plan(self) -> str:
        return DECIDE

    def threshold_c(self, step: int) -> float:
        frac = min(step, self.total_steps) / self.total_steps
        return self.lambda1 * frac + self.lambda2 * (1.0 - frac)

    def decide(self, grad_sq_norm: float) -> bool:
        s = float(grad_sq_norm)
        if not math.isfinite(s):
            return False
        d = self.delta
        self.mean = d * self.mean + (1.0 - d) * s
        self.var = d * self.var + (1.0 - d) * (s - self.mean) ** 2
        return s >= self.mean + self.threshold_c(self.step) * math.sqrt(self.var)

    def fraction(self) -> float:
        """The fraction of SAM steps if ||g||^2 were normally distributed (AE-SAM's model):
        the mean over the schedule of P(Z >= c_t) = (1 - erf(c_t / sqrt 2)) / 2."""
        cs = [self.lambda1 * i / 100 + self.lambda2 * (1 - i / 100) for i in range(101)]
        return sum((1 - math.erf(c / math.sqrt(2))) / 2 for c in cs) / len(cs)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "mean": self.mean, "var": self.var}

    def _load(self, state: dict[str, Any]) -> dict[str, Any]:
        values = super()._load(state)
        for key in ("mean", "var"):
            v = state.get(key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or (key == "var" and v < 0):
                raise ValueError(f"Invalid state_dict: AdaptiveSAM {key} {v!r}")
            values[key] = float(v)
        return values

    def __repr__(self) -> str:
        return (f"AdaptiveSAM(total_steps={self.total_steps}, delta={self.delta}, "
                f"lambda1={self.lambda1}, lambda2={self.lambda2}, step={self.step})")

r"""The SAM optimizer: API, validation and the two-pass step state machine.

The arithmetic lives in a backend (``samfast.backends``); the base optimizer (SGD, AdamW, ...)
does the descent. ``opt.param_groups`` *is* ``opt.base_optimizer.param_groups``, so LR
schedulers and any code that edits groups see one set of hyper-parameters. A policy
(``samfast.policies``: Interval, LookSAM, RandomSwitch, AdaptiveSAM) decides per step whether
and how the ascent runs; the state machine below carries out its plan.
"""

from __future__ import annotations

import math
import time
import weakref
from typing import Any, Callable

import torch
from torch import Tensor

from . import fsdp as _fsdp
from . import policies as _policies
from .backends import resolve_backend

# Group keys owned by SAM. The epsilon is stored as "sam_eps": "eps" belongs to Adam & co.,
# whose group dicts we share.
_SAM_DEFAULT_KEYS = ("rho", "adaptive", "eta", "normalize", "sam_eps")
_STATE_FORMAT = 1

# Step phases: between first_step and second_step the weights hold w + e ("perturbed"), or the
# first step was skipped for a non-finite gradient, or it took a whole one-pass step that a
# policy planned ("stepped"), and second_step must only clean up.
_IDLE, _PERTURBED, _SKIPPED, _STEPPED = "idle", "perturbed", "skipped", "stepped"


def _check_number(name: str, value: Any, *, minimum: float = 0.0) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"Invalid {name}: {value!r} (must be a real number >= {minimum:g})")
    if not math.isfinite(value) or value < minimum:
        raise ValueError(f"Invalid {name}: {value!r} (must be a finite number >= {minimum:g})")


def _check_tensor_or_number(name: str, value: Any) -> None:
    """A number, or a one-element floating tensor (e.g. for CUDA graphs, where a scheduler
    updates it in place); its value is checked once, here."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or not value.is_floating_point() or value.requires_grad:
            raise ValueError(f"Invalid {name}: a tensor {name} must be a one-element floating "
                             f"tensor that does not require grad (got shape "
                             f"{tuple(value.shape)}, dtype {value.dtype})")
        value = float(value)
    _check_number(name, value)


# Base-optimizer options SAM checks too: torch.optim compares them with `< 0`, which lets NaN
# through (a NaN lr turns every weight into NaN at the first step).
_BASE_NUMBERS = ("lr", "momentum", "dampening", "weight_decay")


def _check_options(group: dict) -> None:
    """The option values of one param group (SAM's and the checked base options)."""
    _check_tensor_or_number("rho", group["rho"])
    _check_number("eta", group["eta"])
    _check_number("eps", group["sam_eps"])
    for flag in ("adaptive", "normalize"):
        if not isinstance(group[flag], bool):
            raise ValueError(f"Invalid {flag}: {group[flag]!r} (must be a bool)")
    if group.get("maximize", False):
        raise ValueError("Invalid maximize: True is not supported by SAM (the ascent would "
                         "need to flip sign); minimize the negated loss instead")
    for key in _BASE_NUMBERS:
        if key in group:
            _check_tensor_or_number(key, group[key])


def _check_group(group: dict) -> None:
    _check_options(group)
    for p in group["params"]:
        if p.is_complex():
            raise ValueError("Invalid params: complex parameters are not supported by SAM")
        if p.layout != torch.strided:
            raise ValueError(f"Invalid params: {p.layout} parameters are not supported by SAM")
        if not p.is_floating_point():
            raise ValueError(f"Invalid params: dtype {p.dtype} is not a floating point dtype")


# Per-param state entries of torch.optim optimizers that have the param's shape: a loaded
# tensor of another shape would be broadcast into place by a copy, so it is refused.
_PARAM_SHAPED_STATE = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq",
                       "square_avg", "acc_delta", "sum", "grad_avg", "exp_inf", "ax", "prev",
                       "step_size")


def _grad_hook(optimizer_ref: weakref.ref):
    """A post-accumulate-grad hook that reaches the optimizer through a weak reference, so a
    dropped optimizer is freed (and its hooks removed) instead of living on in its params."""
    def hook(p: Tensor) -> None:
        optimizer = optimizer_ref()
        if optimizer is not None:
            optimizer._on_grad(p)
    return hook


def _remove_hooks(handles: list) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


class SAM(torch.optim.Optimizer):
    r"""Sharpness-Aware Minimization (Foret et al., 2021) around any ``torch.optim`` optimizer.

    For each parameter :math:`w` with gradient :math:`g` (per param group: ``rho``,
    ``adaptive``, ``eta``, ``normalize``, ``sam_eps`` = the constructor's ``eps``):

    .. math::

        T(w) &= |w| + \eta \ \text{if adaptive (ASAM) else } 1 \\
        N &= \big\| \mathrm{concat}_{\text{all params with grads, all groups}}\ T(w)\,g \big\|_2
             \quad \text{(fp32 accumulation, fp64 if any grad is fp64)} \\
        e &= \rho\, T(w)^2 g / (N + \epsilon) \ \text{if normalize, else } \rho\, T(w)^2 g

    ``first_step`` saves w and sets :math:`w \leftarrow w + e`; ``second_step`` restores w
    bit-exactly and runs the base optimizer with the gradient taken at :math:`w + e`.

    Params with ``grad is None`` are neither perturbed nor stepped. If N (first pass) or any
    second-pass gradient is not finite, the step is skipped: weights and optimizer state end
    bit-identical to before, and ``skipped_steps`` grows by one. ``base_step`` (the SGD phase of
    a switch schedule) skips non-finite gradients the same way.

    Args:
        params: tensors or param-group dicts (groups may set any SAM or base option).
        base_optimizer: a ``torch.optim.Optimizer`` class (or factory ``f(param_groups, **kw)``).
        rho: neighbourhood radius, >= 0: a float, or a one-element tensor (as ``lr`` may be:
            the fused backends read both on the device, so a CUDA graph of the step replays
            their current values; put them on the params' device).
        adaptive: ASAM's scale-invariant neighbourhood T(w) = |w| + eta.
        eta: ASAM's offset, >= 0.
        normalize: divide by N (SAM/ASAM); False gives unnormalized SAM (USAM).
        eps: added to N, >= 0 (stored in the groups as ``sam_eps``; a base optimizer's own
            ``eps`` goes through a factory: ``functools.partial(torch.optim.AdamW, eps=1e-6)``).
        backend: "auto", "reference", "native" or "triton" (see
            :func:`samfast.available_backends`).
        policy: a :class:`samfast.policies.Policy` deciding per step whether and how the
            ascent runs (``Interval``, ``LookSAM``, ``RandomSwitch``, ``AdaptiveSAM``), or
            None: every step while ``sam_enabled`` is a SAM step.
        **base_kwargs: passed to ``base_optimizer`` (``lr``, ``momentum``, ``weight_decay``...).
    """

    def __init__(self, params, base_optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.SGD,
                 rho: float | Tensor = 0.05, adaptive: bool = False, eta: float = 0.0,
                 normalize: bool = True, eps: float = 1e-12, backend: str = "auto",
                 policy: _policies.Policy | None = None, **base_kwargs: Any) -> None:
        if isinstance(base_optimizer, torch.optim.Optimizer) or not callable(base_optimizer):
            raise TypeError("Invalid base_optimizer: pass an optimizer class such as "
                            f"torch.optim.SGD, not {type(base_optimizer).__name__}")
        defaults = dict(rho=rho, adaptive=adaptive, eta=eta, normalize=normalize, sam_eps=eps)
        _check_group({**defaults, **base_kwargs, "params": []})
        self._base_optimizer_ready = False
        super().__init__(params, {**defaults, **base_kwargs})
        # The base optimizer adopts our group dicts (same objects); then we share its list and
        # its state, so schedulers and state_dict see exactly one copy of everything.
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        if not isinstance(self.base_optimizer, torch.optim.Optimizer):
            raise TypeError("Invalid base_optimizer: it must build a torch.optim.Optimizer, got "
                            f"{type(self.base_optimizer).__name__}")
        clash = sorted(set(_SAM_DEFAULT_KEYS) & set(self.base_optimizer.defaults))
        if clash:
            raise ValueError(f"Invalid base_optimizer: its option {clash[0]!r} has the same name "
                             "as a SAM option, so the shared param groups cannot hold both")
        self._base_optimizer_ready = True
        self._share_base_state()
        self.defaults.update(self.base_optimizer.defaults)
        _check_group({**self.defaults, "params": []})

        params = [p for g in self.param_groups for p in g["params"]]
        devices = {p.device for p in params} or {torch.device("cpu")}
        # FSDP2 (DTensor params): every backend on the local shards (samfast/fsdp.py)
        self._sharding = _fsdp.sharding_of(params)
        self._backend = resolve_backend(backend, devices, {p.dtype for p in params} or
                                        {torch.float32}, sharded=self._sharding is not None)
        self._backend.bind(self)
        self.sam_enabled = True
        self.skipped_steps = 0
        self._phase = _IDLE
        self._policy: _policies.Policy | None = None
        self._plan: str | None = None      # the current step's policy plan, once taken
        self._policy_before: dict | None = None  # its state before a "decide" changed it
        self._first_pass_record: dict | None = None
        self._first_half_s = 0.0  # first_step's time in a two-pass step
        self.policy = policy
        self.reset_counters()
        self._first_pass_found_inf: dict = {}
        # Post-accumulate-grad hooks: a backward reached a param (the fused backends move its
        # fresh gradient into their flat buffer; step(closure) learns a backward ran before).
        self._grads_arrived = False
        self._hook_handles: list = []
        self._hooked: set[int] = set()
        self._unhooked: list[Tensor] = []
        self._hook = _grad_hook(weakref.ref(self))
        weakref.finalize(self, _remove_hooks, self._hook_handles)
        self._hook_params(p for g in self.param_groups for p in g["params"])

    # -- param groups and state are the base optimizer's -------------------------------------

    def _share_base_state(self) -> None:
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state

    # -- gradient hooks ---------------------------------------------------------------------

    def _hook_params(self, params) -> None:
        for p in params:
            if id(p) in self._hooked:
                continue
            if not p.requires_grad:  # frozen: hooked once it is unfrozen
                self._unhooked.append(p)
                continue
            self._hook_handles.append(p.register_post_accumulate_grad_hook(self._hook))
            self._hooked.add(id(p))

    def _hook_unfrozen(self) -> None:
        if self._unhooked:
            waiting, self._unhooked = self._unhooked, []
            self._hook_params(waiting)

    def _on_grad(self, p: Tensor) -> None:
        self._grads_arrived = True
        self._backend.on_grad(p)

    def _has_grads(self) -> bool:
        return any(p.grad is not None for g in self.param_groups for p in g["params"])

    def _check_lrs(self) -> None:
        """A scheduler may have set a NaN or negative lr since the last check: refuse the step
        before anything changes (tensor lrs are checked at construction only: no sync)."""
        for i, group in enumerate(self.param_groups):
            lr = group.get("lr")
            if isinstance(lr, (int, float)) and not (math.isfinite(lr) and lr >= 0):
                raise ValueError(f"Invalid lr: {lr!r} in param group {i} (must be a finite "
                                 "number >= 0; was it set by an LR scheduler?)")

    def add_param_group(self, param_group: dict) -> None:
        params = param_group["params"]
        if isinstance(params, Tensor):
            params = [params]
        elif not isinstance(params, set):  # torch.optim rejects sets itself, with its message
            params = list(params)
        param_group["params"] = params
        for key in _SAM_DEFAULT_KEYS:
            param_group.setdefault(key, self.defaults[key])
        if not isinstance(params, set):
            _check_group({**self.defaults, **param_group})
        if self._base_optimizer_ready:
            sharding = _fsdp.sharding_of([*self._params_in_order(), *params])
            if (sharding is None) != (self._sharding is None):
                raise ValueError("Invalid params: the new group's params are "
                                 f"{'plain tensors' if sharding is None else 'DTensors (FSDP2)'}"
                                 ", the optimizer's are not")
        if not self._base_optimizer_ready:
            super().add_param_group(param_group)
        else:
            self.base_optimizer.add_param_group(param_group)  # appends to our shared list
            self._backend.add_group(len(self.param_groups) - 1)
            self._hook_params(self.param_groups[-1]["params"])
            self._backend.invalidate_gv()  # LookSAM's g_v has no part for the new params

    @property
    def backend(self) -> str:
        """Name of the backend in use."""
        return self._backend.name

    @property
    def sam_enabled(self) -> bool:
        """When False, ``step(closure)`` is one pass plus a plain base-optimizer step."""
        return self._sam_enabled

    @sam_enabled.setter
    def sam_enabled(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"sam_enabled must be a bool, got {value!r}")
        self._sam_enabled = value

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for a non-finite gradient (reading it syncs with a CUDA device)."""
        device_count = 0 if self._skipped_device is None else int(self._skipped_device.item())
        return self._skipped_host + device_count

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self._skipped_host, self._skipped_device = int(value), None

    def _count_skip(self, skipped) -> None:
        """Backends report a skip as a bool, or as a device flag (no host sync on CUDA)."""
        if isinstance(skipped, Tensor):
            if self._skipped_device is None:
                self._skipped_device = torch.zeros((), dtype=torch.int64, device=skipped.device)
            self._skipped_device += skipped.to(self._skipped_device.device)
        elif skipped:
            self._skipped_host += 1

    @property
    def perturbed(self) -> bool:
        """True between ``first_step`` and ``second_step`` (weights hold w + e): the second
        forward and backward pass is due. False after a ``first_step`` that took a one-pass
        step a policy planned (``second_step`` then only finishes the step)."""
        return self._phase == _PERTURBED

    @property
    def second_pass_due(self) -> bool:
        """True between ``first_step`` and ``second_step`` of a two-pass (SAM) step: the second
        forward and backward pass belongs to it (after a skipped ascent too, where it changes
        nothing but keeps DDP replicas in step). False after a ``first_step`` that took a
        one-pass step its policy planned, and when idle."""
        return self._phase in (_PERTURBED, _SKIPPED)

    # -- the policy ---------------------------------------------------------------------------

    @property
    def policy(self) -> _policies.Policy | None:
        """The per-step policy (``samfast.policies``), or None: SAM on every enabled step."""
        return self._policy

    @policy.setter
    def policy(self, policy: _policies.Policy | None) -> None:
        if policy is not None and not isinstance(policy, _policies.Policy):
            raise TypeError("Invalid policy: a samfast.policies.Policy (Interval, LookSAM, "
                            f"RandomSwitch, AdaptiveSAM) or None, not {type(policy).__name__}")
        if self._phase != _IDLE:
            raise RuntimeError("SAM.policy set between first_step and second_step")
        if isinstance(policy, _policies.LookSAM) and self._sharding is not None:
            raise ValueError("Invalid policy: LookSAM is not supported with FSDP2 (DTensor) "
                             "params yet (its projection needs sharded dot products)")
        if isinstance(policy, _policies.LookSAM):
            missing = getattr(self._backend, "missing_ops", lambda names: [])(
                ("looksam_dots", "looksam_project_", "looksam_reuse_"))
            if missing:
                raise ValueError(f"Invalid policy: backend {self.backend!r} has no kernels for "
                                 f"{', '.join(missing)} (samfast._C built before LookSAM: "
                                 "rebuild it, or use backend='reference' or 'triton')")
        elif hasattr(self._backend, "release_gv"):
            self._backend.release_gv()  # LookSAM's g_v buffer, if a LookSAM policy left one
        self._policy, self._plan, self._policy_before = policy, None, None

    def plan_step(self) -> str:
        """What the next step will do (``samfast.policies.PLANS``): "base" while
        ``sam_enabled`` is False, else the policy's plan ("sam" without a policy). The same
        until that step is taken; for "decide" the first pass decides (see ``first_step``).
        ``samfast.distributed.sam_step`` reads it to know how many passes to run."""
        if self._phase != _IDLE:
            raise RuntimeError("SAM.plan_step called between first_step and second_step")
        if not self.sam_enabled:
            return _policies.BASE_STEP
        if self._policy is None:
            return _policies.SAM_STEP
        if self._plan is None:
            plan = self._policy.plan()
            if plan not in _policies.PLANS:
                raise ValueError(f"Invalid policy: {type(self._policy).__name__}.plan() returned "
                                 f"{plan!r} (one of {', '.join(_policies.PLANS)})")
            self._plan = plan
        return self._plan

    def _end_policy_step(self) -> None:
        if self._plan is not None:
            self._policy.advance()
        self._plan = self._policy_before = None

    def reset_counters(self) -> None:
        """Zero :attr:`counters`."""
        self._counters = {"steps": 0, "sam_steps": 0, "passes": 0, "optimizer_s": 0.0}

    @property
    def counters(self) -> dict[str, Any]:
        """What the steps since the last :meth:`reset_counters` cost: ``steps`` taken,
        ``sam_steps`` (two-pass steps), ``passes`` (forward + backward passes the steps
        consumed: two per SAM step, one per other step) and ``optimizer_s``, the host time
        spent in this optimizer's step methods (on CUDA the kernels run asynchronously, so
        this is their launch time unless the caller synchronizes)."""
        return dict(self._counters)

    def _count_step(self, passes: int, seconds: float) -> None:
        c = self._counters
        c["steps"] += 1
        c["sam_steps"] += passes == 2
        c["passes"] += passes
        c["optimizer_s"] += seconds

    # -- the step ---------------------------------------------------------------------------

    def _mark_stepped(self) -> None:
        # LR schedulers warn when scheduler.step() precedes optimizer.step(); they detect the
        # latter through this flag, which the explicit API must set as step() would.
        self._opt_called = True

    def _check_grads(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    raise RuntimeError("SAM does not support sparse gradients")

    def _unscale(self, grad_scaler, second: bool) -> None:
        """fp16 AMP: unscale the gradients with ``grad_scaler`` (recording its inf checks).

        GradScaler allows one ``unscale_`` per optimizer between updates; a SAM step has two
        backward passes, so after the first we take its record back out (private state:
        ``_per_optimizer_states``) and after the second we merge both, so that
        ``grad_scaler.update()`` backs off when either pass overflowed.
        """
        if grad_scaler is None or not grad_scaler.is_enabled():
            return
        if self._sharding is not None:
            raise ValueError("Invalid grad_scaler: fp16 loss scaling is not supported with FSDP2 "
                             "(DTensor) params yet (the ranks would have to agree on the "
                             "overflows of their shards); use bf16 (FSDP2's MixedPrecisionPolicy"
                             " or autocast)")
        grad_scaler.unscale_(self)
        states = grad_scaler._per_optimizer_states
        if not second:
            self._first_pass_record = states.pop(id(self))
            self._first_pass_found_inf = self._first_pass_record["found_inf_per_device"]
            return
        self._first_pass_record = None
        found = states[id(self)]["found_inf_per_device"]
        for device, flag in getattr(self, "_first_pass_found_inf", {}).items():
            found[device] = found[device] + flag if device in found else flag
        self._first_pass_found_inf = {}

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, grad_scaler=None, *,
                   agree_skip: Callable[[Tensor], None] | None = None) -> None:
        """Ascent: w <- w + e(g), remembering w. Skipped (counted) when N is not finite.

        With fp16 AMP pass ``grad_scaler`` (a ``torch.amp.GradScaler`` whose ``scale(loss)``
        the backward used): the gradients are unscaled first. ``agree_skip`` (advanced: used by
        :func:`samfast.distributed.sam_step` for per-replica ascents) receives the 0-d bool
        skip flag and may change it in place, e.g. all-reduce it with MAX so that every
        process skips together."""
        if self._phase != _IDLE:
            raise RuntimeError("SAM.first_step called twice without second_step in between")
        self._check_grads()
        self._check_lrs()
        start = time.perf_counter()
        # Without a policy the explicit API always ascends (whatever sam_enabled says).
        plan = self.plan_step() if self._policy is not None else _policies.SAM_STEP
        self._first_pass_record = None
        if plan == _policies.DECIDE:
            self._unscale(grad_scaler, second=False)
            sq = self._backend.grad_sq_norm(self.param_groups)  # a host sync on CUDA
            self._policy_before = self._policy.state_dict()
            plan = _policies.SAM_STEP if self._policy.decide(float(sq)) else _policies.BASE_STEP
            if plan == _policies.BASE_STEP and self._first_pass_record is not None:
                # a one-pass step after all: GradScaler gets back its record of this pass
                grad_scaler._per_optimizer_states[id(self)] = self._first_pass_record
                self._first_pass_record, self._first_pass_found_inf = None, {}
        elif plan in _policies.TWO_PASS_PLANS:
            self._unscale(grad_scaler, second=False)
        else:
            self._unscale(grad_scaler, second=True)
        if plan in _policies.TWO_PASS_PLANS:
            skipped = self._backend.first_step(
                self.param_groups, agree_skip,
                **({"store_grad": True} if plan == _policies.LOOKSAM_FULL else {}))
            if skipped is True:
                self._phase = _SKIPPED
                self._count_skip(True)
            else:  # False, or a device flag that second_step's own flag will include
                self._phase = _PERTURBED
            self._first_half_s = time.perf_counter() - start
        else:  # "base" or "looksam_reuse": the whole step, now
            reuse = ({"reuse": (self._policy.alpha, self._policy.eps)}
                     if plan == _policies.LOOKSAM_REUSE else {})
            self._count_skip(self._backend.base_step(self.param_groups,
                                                     self.base_optimizer.step, **reuse))
            self._phase = _STEPPED
            self._grads_arrived = False
            self._mark_stepped()
            self._end_policy_step()
            self._count_step(1, time.perf_counter() - start)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, grad_scaler=None) -> None:
        """Descent: restore w, then the base optimizer's step with the gradient at w + e.

        With fp16 AMP pass the same ``grad_scaler`` as to ``first_step``, then call
        ``grad_scaler.update()`` (not ``grad_scaler.step``)."""
        if self._phase == _IDLE:
            raise RuntimeError("SAM.second_step called without a preceding first_step")
        if self._phase == _STEPPED:  # first_step took the whole (one-pass) step
            self._phase = _IDLE
            if zero_grad:
                self.zero_grad()
            return
        try:
            self._check_lrs()
        except ValueError:
            self.abort_step()
            raise
        start = time.perf_counter()
        self._unscale(grad_scaler, second=True)
        if self._phase == _PERTURBED:
            self._check_grads()
            project = ({"project": True} if self._plan == _policies.LOOKSAM_FULL else {})
            self._count_skip(self._backend.second_step(self.param_groups,
                                                       self.base_optimizer.step, **project))
        self._phase = _IDLE
        self._grads_arrived = False
        self._mark_stepped()
        self._end_policy_step()
        self._count_step(2, self._first_half_s + time.perf_counter() - start)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def base_step(self, zero_grad: bool = False, grad_scaler=None) -> None:
        """A plain base-optimizer step (no perturbation), e.g. the SGD phase of a schedule
        (with fp16 AMP: pass ``grad_scaler``, then call ``grad_scaler.update()``)."""
        if self._phase != _IDLE:
            raise RuntimeError("SAM.base_step called between first_step and second_step")
        self._check_grads()
        self._check_lrs()
        start = time.perf_counter()
        self._unscale(grad_scaler, second=True)
        self._count_skip(self._backend.base_step(self.param_groups, self.base_optimizer.step))
        self._grads_arrived = False
        self._mark_stepped()
        self._count_step(1, time.perf_counter() - start)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def abort_step(self) -> None:
        """Undo a ``first_step``: put the weights back to w and return to idle, with the
        optimizer state untouched (for a second pass that failed). A no-op when idle.
        ``step(closure)`` calls it when the second closure pass raises. The policy does not
        advance (the step is to be retried), except that an aborted LookSAM full step has
        already replaced the stored g_v by the first-pass gradient: g_v is invalid until the
        next full step."""
        if self._phase == _PERTURBED:
            self._backend.abort()
        if self._phase in (_PERTURBED, _SKIPPED) and self._policy_before is not None:
            # the step is to be retried: a "decide" plan decides again, from its state before
            self._policy.load_state_dict(self._policy_before)
            self._policy_before = None
        self._phase = _IDLE
        self._first_pass_found_inf = {}
        self._first_pass_record = None

    def _run_closure(self, closure: Callable[[], Tensor], which: str) -> Tensor:
        with torch.enable_grad():
            loss = closure()
        if not self._has_grads():
            raise RuntimeError(f"SAM.step: the closure computed no gradients in the {which} pass "
                               "(did it call loss.backward()?)")
        return loss

    def step(self, closure: Callable[[], Tensor] | None = None,  # type: ignore[override]
             grad_scaler=None) -> Tensor | None:
        """Full step from a closure that runs forward and backward and returns the loss.

        Both closure conventions in use give the same step:

        * no backward before ``step``: the closure is called for both passes (this
          optimizer clears the gradients before each call, so the closure may zero them
          itself or not); returns the first-pass loss;
        * ``loss.backward(); opt.step(closure)`` (davda54/sam, pytorch-optimizer): the
          gradients of that backward are the first pass, and the closure is called once, at
          w + e; returns None, as they do.

        Two passes when ``sam_enabled`` (the second with the weights perturbed: see
        ``perturbed``), else one pass and a base step. If the second pass raises, the weights
        are restored before the exception propagates. With fp16 AMP the closure
        back-propagates ``grad_scaler.scale(loss)``; pass ``grad_scaler`` here and call
        ``grad_scaler.update()`` after.
        """
        if closure is None:
            raise RuntimeError("SAM.step needs a closure (forward, backward, return the loss); "
                               "or call first_step() and second_step() yourself")
        self._hook_unfrozen()
        self._check_lrs()
        if self._grads_arrived and self._has_grads():
            loss = None  # the caller's backward was the first pass
        else:
            self.zero_grad()
            loss = self._run_closure(closure, "first")
        if not self.sam_enabled:
            self.base_step(grad_scaler=grad_scaler)
            return loss
        self.first_step(zero_grad=True, grad_scaler=grad_scaler)
        if self._phase == _PERTURBED:
            try:
                self._run_closure(closure, "second")
            except BaseException:
                self.abort_step()
                raise
        self.second_step(grad_scaler=grad_scaler)
        return loss

    def reset_base_state(self) -> None:
        """Forget the base optimizer's state (momentum buffers, Adam moments...), as a freshly
        built optimizer would have; the next step starts them anew."""
        if self._phase == _PERTURBED:
            raise RuntimeError("SAM.reset_base_state called between first_step and second_step")
        self.base_optimizer.state.clear()
        self._backend.state_replaced()

    # -- checkpoints ------------------------------------------------------------------------

    def _params_in_order(self) -> list[Tensor]:
        """Params in the order torch.optim numbers them in a state dict."""
        return [p for g in self.param_groups for p in g["params"]]

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict (groups carry the SAM options) plus samfast's own.
        Loads with ``torch.load(weights_only=True)``; no host sync for ``skipped_steps``."""
        if self._phase == _PERTURBED:
            raise RuntimeError("SAM.state_dict called between first_step and second_step: the "
                               "model holds perturbed weights w + e; save after second_step")
        state = self.base_optimizer.state_dict()
        unstarted = self._backend.unstarted_momentum()
        if unstarted:  # their first step was skipped: torch would have no buffer yet
            index = {id(p): i for i, p in enumerate(self._params_in_order())}
            for p in unstarted:
                i = index[id(p)]
                entry = {k: v for k, v in state["state"][i].items() if k != "momentum_buffer"}
                if entry:
                    state["state"][i] = entry
                else:
                    del state["state"][i]
        skipped = (self._skipped_host if self._skipped_device is None
                   else self._skipped_device + self._skipped_host)
        state["samfast"] = {"format": _STATE_FORMAT, "sam_enabled": self.sam_enabled,
                            "skipped_steps": skipped}
        if self._policy is not None:
            own = self._policy.state_dict()
            if isinstance(self._policy, _policies.LookSAM):
                own["looksam"] = self._backend.looksam_state(self._params_in_order())
            state["samfast"]["policy"] = own
        return state

    def _validate_state_dict(self, state_dict: dict, own: dict) -> None:
        """Everything a load would install, checked before anything changes."""
        groups = state_dict.get("param_groups")
        if not isinstance(groups, list) or not isinstance(state_dict.get("state"), dict):
            raise ValueError("Invalid state_dict: it needs 'state' and 'param_groups' (an "
                             "optimizer state dict)")
        if len(groups) != len(self.param_groups):
            raise ValueError(f"Invalid state_dict: {len(groups)} param groups, the optimizer has "
                             f"{len(self.param_groups)}")
        params = self._params_in_order()
        for i, (saved, current) in enumerate(zip(groups, self.param_groups)):
            if not isinstance(saved, dict) or len(saved.get("params", ())) != len(current["params"]):
                raise ValueError(f"Invalid state_dict: param group {i} does not match the "
                                 "optimizer's (different number of params)")
            options = {k: self.defaults[k] for k in _SAM_DEFAULT_KEYS}
            options.update({k: v for k, v in saved.items() if k != "params"})
            try:
                _check_options(options)
            except ValueError as exc:
                raise ValueError(f"Invalid state_dict: param group {i}: {exc}") from None
        for key, entry in state_dict["state"].items():
            if not isinstance(key, int) or not 0 <= key < len(params):
                raise ValueError(f"Invalid state_dict: state for param {key!r}, which the "
                                 "optimizer does not have")
            p = params[key]
            for name in _PARAM_SHAPED_STATE:
                t = entry.get(name) if isinstance(entry, dict) else None
                if t is None:
                    continue
                if not isinstance(t, Tensor) or t.shape != p.shape or not t.is_floating_point():
                    got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                    raise ValueError(f"Invalid state_dict: {name} of param {key} is {got}, the "
                                     f"param has shape {tuple(p.shape)}")
        skipped = own.get("skipped_steps", 0)
        if isinstance(skipped, Tensor):
            skipped = int(skipped)
        if isinstance(skipped, bool) or not isinstance(skipped, int) or skipped < 0:
            raise ValueError(f"Invalid state_dict: samfast.skipped_steps is {skipped!r}")
        if not isinstance(own.get("sam_enabled", True), bool):
            raise ValueError("Invalid state_dict: samfast.sam_enabled must be a bool")
        policy = own.get("policy")
        if policy is not None:
            if self._policy is None:
                raise ValueError("Invalid state_dict: it holds the state of a "
                                 f"{policy.get('name') if isinstance(policy, dict) else '?'!r} "
                                 "policy and this optimizer has none (set opt.policy first)")
            self._policy.check_state_dict(policy)
            if isinstance(self._policy, _policies.LookSAM):
                self._check_looksam_state(policy.get("looksam"), params)

    @staticmethod
    def _check_looksam_state(state, params: list[Tensor]) -> None:
        if not isinstance(state, dict):
            raise ValueError("Invalid state_dict: the LookSAM policy state has no 'looksam' "
                             "entry (g_v)")
        gvs = state.get("gv")
        if not isinstance(gvs, list) or len(gvs) != len(params):
            raise ValueError("Invalid state_dict: LookSAM's g_v must be a list with one entry "
                             f"per param ({len(params)})")
        for i, (gv, p) in enumerate(zip(gvs, params)):
            if gv is not None and (not isinstance(gv, Tensor) or gv.shape != p.shape
                                   or not gv.is_floating_point()):
                got = tuple(gv.shape) if isinstance(gv, Tensor) else type(gv).__name__
                raise ValueError(f"Invalid state_dict: LookSAM's g_v of param {i} is {got}, "
                                 f"the param has shape {tuple(p.shape)}")
        sq, valid = state.get("gv_sq_norm"), state.get("gv_valid")
        if sq is not None and (not isinstance(sq, Tensor) or sq.numel() != 1
                               or not sq.is_floating_point()):
            raise ValueError("Invalid state_dict: LookSAM's gv_sq_norm must be a one-element "
                             "floating tensor")
        if valid is not None and not (isinstance(valid, Tensor) and valid.numel() == 1
                                      and valid.dtype == torch.bool):
            raise ValueError("Invalid state_dict: LookSAM's gv_valid must be a one-element "
                             "bool tensor")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``torch.optim``: every value is validated first (shapes, option values, a finite
        lr...), so a refused load leaves the optimizer exactly as it was."""
        if self._phase == _PERTURBED:
            raise RuntimeError("SAM.load_state_dict called between first_step and second_step")
        if not isinstance(state_dict, dict):
            raise TypeError(f"Invalid state_dict: a dict, not {type(state_dict).__name__}")
        state_dict = dict(state_dict)
        own = state_dict.pop("samfast", {})
        if not isinstance(own, dict):
            raise ValueError("Invalid state_dict: its 'samfast' entry must be a dict")
        self._validate_state_dict(state_dict, own)
        old_state, old_groups = self.base_optimizer.state, self.base_optimizer.param_groups
        try:
            self.base_optimizer.load_state_dict(state_dict)
        except BaseException:
            self.base_optimizer.state, self.base_optimizer.param_groups = old_state, old_groups
            raise
        self._share_base_state()  # load_state_dict replaced the base's lists
        for group in self.param_groups:
            for key in _SAM_DEFAULT_KEYS:
                group.setdefault(key, self.defaults[key])
        self._backend.state_replaced()
        self.sam_enabled = own.get("sam_enabled", True)
        skipped = own.get("skipped_steps", 0)
        self.skipped_steps = int(skipped)
        policy = own.get("policy")
        if policy is not None:  # absent (e.g. a snapshot of an SGD run): the policy starts anew
            self._policy.load_state_dict(policy)
            if isinstance(self._policy, _policies.LookSAM):
                looksam = policy["looksam"]
                self._backend.load_looksam_state(self._params_in_order(), {
                    "gv": looksam["gv"], "gv_sq_norm": looksam.get("gv_sq_norm"),
                    "gv_valid": looksam.get("gv_valid", torch.tensor(False))})
        self._plan = self._policy_before = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As ``torch.optim``: with ``set_to_none`` every ``p.grad`` becomes None; otherwise
        existing grads are zeroed in place (one fill of the flat buffer on the fused
        backends) and those params are stepped with zero gradients."""
        self._hook_unfrozen()
        self._grads_arrived = False
        self._backend.zero_grad(set_to_none=set_to_none)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(base_optimizer={type(self.base_optimizer).__name__}, "
                f"backend={self.backend!r}, sam_enabled={self.sam_enabled}, "
                f"policy={self._policy!r})\n"
                + super().__repr__())


class ASAM(SAM):
    """Adaptive SAM (Kwon et al., 2021): :class:`SAM` with ``adaptive=True`` (default rho 2.0,
    as in davda54/sam's ASAM recipe)."""

    def __init__(self, params, base_optimizer=torch.optim.SGD, rho: float = 2.0,
                 eta: float = 0.0, **kwargs: Any) -> None:
        super().__init__(params, base_optimizer, rho=rho, adaptive=True, eta=eta, **kwargs)


class USAM(SAM):
    """Unnormalized SAM (Andriushchenko & Flammarion, 2022): :class:`SAM` with
    ``normalize=False``, i.e. e = rho * g."""

    def __init__(self, params, base_optimizer=torch.optim.SGD, rho: float = 0.05,
                 **kwargs: Any) -> None:
        super().__init__(params, base_optimizer, rho=rho, normalize=False, **kwargs)

"""The one training loop: a round with seams, composed over t (docs/method.md §2; one loop, one round).

Round ``t`` of Adapt-Then-Communicate D-SGD, in this order:

1. **local step** of every node on its batch: ``θ^{t+½} = θ^t + u^t`` (:func:`local_step_`);
2. **transforms** edit the half steps of the nodes that misbehave (update attacks, free riders;
   :class:`Transform`, part of the :class:`~dice_influence.problem.Problem`, so replays repeat
   them);
3. **observers** read what the round carries (:class:`Observer.before_gossip`: proximal
   influence, ledgers);
4. the **policy** decides ``W^t`` (prune, reweight, rewire; :class:`Policy.decide`), reading the
   observers it was built with;
5. **aggregate** (the ``W^t`` matmul, or a robust rule; :class:`Aggregator`, part of the problem);
6. observers read the result (:class:`Observer.after_gossip`).

The simulator (:class:`Loop`) composes this over the stacked parameters of all nodes, vectorized;
a peer (:mod:`dice_influence.distributed.peer`) runs the *same* plug-in objects on its own row
with what arrived from its neighbours. Both see a round through a :class:`RoundView`: rows of
``theta`` belong to ``receivers`` (the nodes whose next parameters this runtime computes) and
rows of ``half`` to ``senders`` (the nodes whose half steps it holds). In the simulator both are
all nodes; on peer ``k`` they are ``[k]`` and ``[k] + in-neighbours``.

With no plug-in active in a round, the loop takes the fast path: the local step in place, one
gossip product into a spare buffer, nothing copied. The ``W^t`` a policy chose is recorded (only
the rounds where it differs from the nominal schedule), so replays (DICE-GT/E, attribution)
repeat a policy-driven run exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ._alloc import clone_huge, empty_like_huge
from .gossip import Mixer, Optimizer, node_grad_list, param_views
from .models import FunctionalModel

if TYPE_CHECKING:
    from .problem import Problem


# ----------------------------------------------------------------------------- the plug-ins


class Plugin:
    """Base of every plug-in. ``active(t)``: whether the plug-in needs round ``t``'s update,
    test gradients or a say in ``W^t`` (inactive rounds take the fast path)."""

    name: str = "plugin"

    def active(self, t: int) -> bool:
        return True

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume (plain JSON/NumPy values)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""

    def summary(self) -> dict[str, Any]:
        """What a run directory's ``metrics.json`` keeps of this plug-in (plain JSON)."""
        return {}


class Transform(Plugin):
    """Edits the updates some nodes send (attacks, free riders). Deterministic given ``t``."""

    def apply(self, t: int, ids: Sequence[int], U: torch.Tensor) -> list[int]:
        """Replace, in place, the rows of ``U`` (``(len(ids), d)``; row ``i`` = node
        ``ids[i]``'s honest update ``u^t``) of the nodes this transform controls; return the
        row positions changed."""
        raise NotImplementedError

    def transform(self, t: int, ids: Sequence[int], U: torch.Tensor) -> torch.Tensor:
        """Pure form of :meth:`apply` (for ``jvp`` / ``vjp`` through the round)."""
        out = U.clone()
        self.apply(t, ids, out)
        return out

    def transpose(self, t: int, ids: Sequence[int], lam: torch.Tensor) -> torch.Tensor | None:
        """The transpose of this round's map ``U -> transform(U)`` applied to the cotangent
        ``lam`` (a new tensor), for a transform that knows it; None (the default): the reverse
        sweeps take it by ``vjp`` through :meth:`transform`."""
        return None


class Observer(Plugin):
    """Reads a round; never changes it."""

    def before_gossip(self, view: RoundView) -> None:
        """After the local step and transforms, before ``W^t`` is decided."""

    def after_gossip(self, view: RoundView, W_used: np.ndarray) -> None:
        """After aggregation (``view.theta_next`` is set); ``W_used`` is the ``W^t`` used."""


class Policy(Plugin):
    """Decides the mixing matrix of a round. Rows stay stochastic, entries ≥ 0."""

    def decide(self, view: RoundView) -> np.ndarray:
        """``W^t`` (n, n); only the rows of ``view.receivers`` are used. Return
        ``view.W_nominal`` itself when nothing changes (the loop then keeps its fast mixer)."""
        return view.W_nominal


class Aggregator:
    """Turns the half steps into the next parameters. The default is the ``W^t`` matmul."""

    name = "gossip"

    def __call__(self, view: RoundView, W: np.ndarray) -> torch.Tensor:
        """``θ^{t+1}`` of ``view.receivers`` ``(len(receivers), d)`` from ``view.half``."""
        raise NotImplementedError


# ----------------------------------------------------------------------------- the view


class RoundView:
    """What round ``t`` shows its plug-ins (module docstring: receivers and senders).

    - ``theta``: ``θ^t`` of the receivers, ``(len(receivers), d)``;
    - ``half``: ``θ^{t+½}`` of the senders after transforms, ``(len(senders), d)``;
    - ``W_nominal``: the schedule's ``W^t`` (n, n), ``W[k, j]`` = weight receiver ``k`` puts
      on sender ``j``;
    - ``update()``: ``u^t`` of the senders, ``test_grad("pre" | "post")``: receivers' test-loss
      gradients at ``θ^t`` / ``θ^{t+1}`` — each computed once, on demand, and cached;
    - ``theta_next``: ``θ^{t+1}`` of the receivers (set after aggregation);
    - ``batch``: the receivers' training batches ``(x, y)`` of the round when the runtime
      passes them (the simulator does; else None): a plug-in that needs them later (the
      contribution observer's reverse sweep) keeps them instead of gathering them again.

    In the simulator (:class:`Loop`) ``theta``, ``update()`` and ``batch`` are this round's own
    tensors, never written after the observers have seen them: a plug-in may keep them without
    a copy (``tests/test_fast_observers.py`` holds the loop to it).
    """

    def __init__(
        self,
        t: int,
        n: int,
        receivers: np.ndarray,
        senders: np.ndarray,
        theta: torch.Tensor,
        half: torch.Tensor,
        W_nominal: np.ndarray,
        *,
        update: torch.Tensor | Callable[[], torch.Tensor] | None = None,
        test_grad_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        pre_grad: torch.Tensor | None = None,
        lr: float = 0.0,
        batch: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        self.t, self.n = t, n
        self.receivers = np.asarray(receivers, dtype=np.int64)
        self.senders = np.asarray(senders, dtype=np.int64)
        self.theta, self.half = theta, half
        self.W_nominal = W_nominal
        self.lr = lr
        self.batch = batch
        self.theta_next: torch.Tensor | None = None
        self._update = update
        self._test_grad_fn = test_grad_fn
        self._grads: dict[str, torch.Tensor] = {}
        if pre_grad is not None:
            self._grads["pre"] = pre_grad
        self._pos: dict[int, int] | None = None

    @property
    def is_full(self) -> bool:
        """True when the view holds every node as receiver and sender (the simulator)."""
        return len(self.receivers) == self.n and len(self.senders) == self.n

    def sender_pos(self, j: int) -> int:
        """Row of sender ``j`` in ``half`` / ``update()``."""
        if self._pos is None:
            self._pos = {int(s): i for i, s in enumerate(self.senders)}
        return self._pos[int(j)]

    def update(self) -> torch.Tensor:
        """``u^t = θ^{t+½} − θ^t`` of the senders (what each sent, transforms included)."""
        if callable(self._update):
            self._update = self._update()
        if self._update is None:
            raise RuntimeError("this runtime did not keep the round's updates")
        return self._update

    def test_grad(self, where: str = "pre") -> torch.Tensor:
        """Receivers' test-loss gradients ``(len(receivers), d)`` at ``θ^t`` (``"pre"``) or
        ``θ^{t+1}`` (``"post"``, after aggregation), on each receiver's own test set."""
        g = self._grads.get(where)
        if g is None:
            if self._test_grad_fn is None:
                raise RuntimeError("this runtime has no test sets for test gradients")
            if where == "pre":
                g = self._test_grad_fn(self.theta)
            elif where == "post":
                if self.theta_next is None:
                    raise RuntimeError("test_grad('post') is only available after aggregation")
                g = self._test_grad_fn(self.theta_next)
            else:
                raise ValueError(f"where={where!r}: choose 'pre' or 'post'")
            self._grads[where] = g
        return g

    def has_grad(self, where: str) -> bool:
        return where in self._grads

    def block(self, M: np.ndarray) -> np.ndarray:
        """``M[receivers][:, senders]`` of an (n, n) matrix."""
        if self.is_full:
            return M
        return M[np.ix_(self.receivers, self.senders)]


# ----------------------------------------------------------------------------- one round


def local_step_(
    fm: FunctionalModel,
    opt: Optimizer,
    theta: torch.Tensor,
    state_views: list[torch.Tensor] | None,
    x: torch.Tensor,
    y: torch.Tensor,
    lr: float,
    t: int,
    *,
    transforms: Sequence[Transform] = (),
    ids: Sequence[int] | None = None,
    keep: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Local step of the rows of ``theta`` (``(m, d)``, node ids ``ids``), **in place**:
    ``theta`` becomes ``θ^{t+½}`` (transforms applied), the optimizer state views are advanced.

    Returns ``(θ^t, u^t)`` when ``keep`` (or a transform is active), else ``(None, None)``.
    The arithmetic is the same whatever is kept, so training and replays are bit-identical."""
    active = [tr for tr in transforms if tr.active(t)]
    prev = theta.clone() if (keep or active) else None
    with torch.enable_grad():
        g = node_grad_list(fm, theta, x, y)
    opt.update_(param_views(fm, theta), state_views, g, lr)
    if prev is None:
        return None, None
    U = theta - prev
    if active:
        rows_ids = list(range(theta.shape[0])) if ids is None else list(ids)
        changed: set[int] = set()
        for tr in active:
            changed.update(tr.apply(t, rows_ids, U))
        if changed:
            r = torch.as_tensor(sorted(changed), device=theta.device)
            theta[r] = prev[r] + U[r]
    return prev, U


class Gossip(Aggregator):
    """``θ_k^{t+1} = Σ_j W^t[k, j] θ_j^{t+½}`` (docs/method.md §2): the default aggregator."""

    name = "gossip"

    def __call__(self, view: RoundView, W: np.ndarray) -> torch.Tensor:
        half = view.half
        if view.is_full:  # zero weights never touch a (possibly non-finite) sender
            return Mixer(W, dtype=half.dtype, device=half.device)(half)
        block = view.block(W)
        out = torch.empty(len(view.receivers), half.shape[1], dtype=half.dtype,
                          device=half.device)
        for i, row in enumerate(block):
            nz = np.flatnonzero(row)
            w = torch.as_tensor(row[nz], dtype=half.dtype, device=half.device)
            out[i] = w @ half[torch.as_tensor(nz, device=half.device)]
        return out


# ----------------------------------------------------------------------------- test mini-batches

TEST_BATCH_ORDERS = ("rotate", "first")
ROTATE_HOLD = 2  # tracked rounds that read one slice before ``rotate`` moves to the next


def readout_rows(t: int, total: int, batch: int | None, order: str = "rotate",
                 every: int = 1) -> torch.Tensor | None:
    """Which of a receiver's ``total`` test samples round ``t`` reads (docs/method.md §5).

    ``None``: all of them (``batch`` is None or at least ``total``). Else ``batch`` = m row
    indices: ``first`` reads rows ``0..m-1`` every round; ``rotate`` gives tracked round
    ``c = t // every`` the slice ``s = c // ROTATE_HOLD``, rows ``(s·m + i) mod total``,
    ``i = 0..m-1``: each slice is read for two consecutive tracked rounds, then the next one,
    wrapping around, so each block of ``2·total / gcd(total, m)`` tracked rounds reads every
    sample exactly ``2·m / gcd(total, m)`` times. (Two rounds per slice: updates alternate in
    sign from one round to the next at the usual learning rates, and a slice that changed every
    round would add that alternation up instead of cancelling it; docs/anomaly.md.) A function
    of ``t`` and the settings only: the simulator, every peer and a resumed run read the same
    rows."""
    if order not in TEST_BATCH_ORDERS:
        raise ValueError(f"test_batch_order={order!r}: choose rotate or first")
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int | np.integer)
                              or batch < 1):
        raise ValueError(f"test_batch={batch!r}: use a whole number >= 1 of test samples "
                         "per receiver, or None for the whole split")
    if every < 1:
        raise ValueError(f"every={every} must be >= 1")
    if batch is None or batch >= total:
        return None
    start = (t // every // ROTATE_HOLD) * batch % total if order == "rotate" else 0
    return torch.arange(start, start + batch) % total


def readout_observer(observers: Sequence[Any]) -> Any:
    """The observer whose ``test_set`` / ``test_batch`` / ``test_batch_order`` / ``every`` a
    runtime reads (the first that names a test set; None if none): the simulator and a peer
    pick the same one."""
    return next((o for o in observers if hasattr(o, "test_set")), None)


# ----------------------------------------------------------------------------- the simulator


class Loop:
    """The simulator's runtime of the one loop: every node, vectorized.

    ``observers`` and ``policy`` are plug-ins for this run; the problem's transforms and
    aggregator are part of the round itself. ``recorded[t]`` holds each ``W^t`` the policy chose
    that differs from the schedule's."""

    def __init__(
        self,
        problem: Problem,
        observers: Sequence[Observer] = (),
        policy: Policy | None = None,
        *,
        test_set: str = "auto",
        test_batch: int | None = None,
        test_batch_order: str = "rotate",
    ) -> None:
        if test_set not in ("auto", "own", "shared"):
            raise ValueError(f"test_set={test_set!r}: choose auto, own or shared")
        readout_rows(0, 1, test_batch, test_batch_order)  # one clear error for bad values
        self.problem = problem
        self.observers = list(observers)
        self.policy = policy
        self.recorded: dict[int, np.ndarray] = {}
        self._mixers: dict[bytes, Mixer] = {}
        self._test: dict[int | None, tuple[torch.Tensor, torch.Tensor]] = {}  # by first row
        self._test_set = test_set
        self._test_batch = test_batch
        self._test_order = test_batch_order
        # rotation advances once per tracked round of the observer that names the test set
        self._test_every = int(getattr(readout_observer(self.observers), "every", 1))
        self._carry_grad: tuple[int, int | None, torch.Tensor] | None = None
        if any(hasattr(o, "test_set") for o in self.observers):  # test gradients every round
            from ._threads import use_threads_for

            use_threads_for(problem, self._test_rows())

    def _per_node_test(self) -> bool:
        """Whether the receivers read their own test splits (else the shared test set)."""
        return self._test_set == "own" or (self._test_set == "auto"
                                           and self.problem.node_test is not None)

    def _test_rows(self) -> int:
        """Test samples per node whose gradients :meth:`_test_grads` takes (0 if none)."""
        p = self.problem
        per_node = self._per_node_test()
        if per_node and p.node_test is None:
            return 0  # refused with a clear error when first used
        rows = int(p.test_set(per_node)[1].shape[-1])
        return min(rows, self._test_batch) if per_node and self._test_batch else rows

    @classmethod
    def from_plugins(cls, problem: Problem, plugins: Any) -> Loop:
        """A loop with the observers and policy of :func:`dice_influence.plugins.build`; the
        test sets are those the first observer that names one asks for."""
        o = readout_observer(plugins.observers)
        test_set = getattr(o, "test_set", "auto")
        test_batch = getattr(o, "test_batch", None)
        order = getattr(o, "test_batch_order", "rotate")
        return cls(problem, plugins.observers, plugins.policy, test_set=test_set,
                   test_batch=test_batch, test_batch_order=order)

    # the receivers' test-loss gradients (per-node test splits when the problem has them)
    def _test_slice(self, t: int) -> tuple[int | None, torch.Tensor | None]:
        """(first row, rows) of the per-node test split round ``t`` reads (None: all of it;
        :func:`readout_rows`)."""
        nt = self.problem.node_test
        if self._test_batch is None or nt is None or not self._per_node_test():
            return None, None  # the whole split (a missing one is refused when first read)
        total = int(nt.y.shape[1])
        rows = readout_rows(t, total, self._test_batch, self._test_order, self._test_every)
        return (None, None) if rows is None else (int(rows[0]), rows)

    def _test_grads(self, theta: torch.Tensor, t: int = 0) -> torch.Tensor:
        from ._mlp import grads  # the built-in MLP's batched pass, else torch.func

        key, rows = self._test_slice(t)
        xy = self._test.get(key)
        if xy is None:
            x, y = self.problem.test_set(self._per_node_test())
            if rows is not None:  # contiguous copies, kept (at most total distinct slices)
                r = rows.to(y.device)
                x, y = x.index_select(1, r), y.index_select(1, r)
            xy = self._test[key] = (x, y)
        return grads(self.problem.fm, theta, *xy)

    def _mixer(self, W: np.ndarray) -> Mixer:
        key = W.tobytes()
        m = self._mixers.get(key)
        if m is None:
            if len(self._mixers) > 64:
                self._mixers.clear()
            p = self.problem
            m = self._mixers[key] = Mixer(W, dtype=p.dtype, device=p.device)
        return m

    def run(
        self,
        theta: torch.Tensor,
        state: torch.Tensor | None,
        start: int,
        stop: int,
        *,
        on_round: Callable[[int, torch.Tensor, torch.Tensor | None], None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Train rounds ``start..stop-1``; ``theta`` / ``state`` are not modified (copies are).
        ``on_round(t+1, theta, state)`` is called after each round (``theta`` = ``θ^{t+1}``)."""
        p = self.problem
        fm = p.fm
        # the round's own buffers on huge pages where they are large (the gossip's column
        # blocks touch one page per node row: fewer TLB misses; same values, _alloc.py)
        theta = clone_huge(theta)
        state = None if state is None else clone_huge(state)
        state_views = None if state is None else param_views(fm, state)
        spare = empty_like_huge(theta)
        agg = p.aggregator
        ids = np.arange(p.n)
        with torch.no_grad():
            for t in range(start, stop):
                busy = [o for o in self.observers if o.active(t)]
                decide = self.policy is not None and self.policy.active(t)
                general = bool(busy) or decide or agg is not None
                x, y = p.batch(t)
                lr = p.lr(t)
                prev, U = local_step_(fm, p.opt, theta, state_views, x, y, lr, t,
                                      transforms=p.transforms, keep=general)
                if not general:
                    p.mixer(t)(theta, out=spare)
                    theta, spare = spare, theta
                else:
                    theta, spare = self._general(t, prev, theta, U, busy, decide, agg, ids,
                                                 spare, lr, (x, y))
                if on_round is not None:
                    on_round(t + 1, theta, state)
        return theta, state

    def _general(self, t, prev, half, U, busy, decide, agg, ids, spare, lr, batch):
        p = self.problem
        W_nom = p.W(t)
        pre = None
        key = self._test_slice(t)[0]
        if self._carry_grad is not None and self._carry_grad[:2] == (t, key):  # same rows
            pre = self._carry_grad[2]
        self._carry_grad = None
        view = RoundView(t, p.n, ids, ids, prev, half, W_nom, update=U,
                         test_grad_fn=lambda th: self._test_grads(th, t), pre_grad=pre, lr=lr,
                         batch=batch)
        for o in busy:
            o.before_gossip(view)
        W = self.policy.decide(view) if decide else W_nom
        if W is not W_nom and not np.array_equal(W, W_nom):
            self.recorded[t] = W
        else:
            W = W_nom
        if agg is not None:
            nxt = agg(view, W)
        else:
            (p.mixer(t) if W is W_nom else self._mixer(W))(half, out=spare)
            nxt, spare = spare, half
        view.theta_next = nxt
        for o in busy:
            o.after_gossip(view, W)
        if view.has_grad("post"):
            self._carry_grad = (t + 1, key, view.test_grad("post"))
        return nxt, spare


def run_rounds(
    problem: Problem,
    theta: torch.Tensor,
    state: torch.Tensor | None,
    start: int,
    stop: int,
    *,
    on_round: Callable[[int, torch.Tensor, torch.Tensor | None], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Train (or replay) rounds ``start..stop-1`` with no plug-ins: the fast path of the one
    loop. Replays of a recorded run are bit-identical to training."""
    return Loop(problem).run(theta, state, start, stop, on_round=on_round)

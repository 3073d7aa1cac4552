"""The rest of the long-time-lag benchmark of Hochreiter & Schmidhuber, "Long Short-Term Memory",
Neural Computation 9(8), 1997, Section 5: generators, success criteria and stopping rules.

Experiments 4 (adding) and 6a (temporal order) live in deepres.data.sequence; this module adds

- Exp. 1, the embedded Reber grammar: next-symbol prediction on 256 training and 256 test strings;
- Exp. 2a/2b/2c, noise-free sequences with long lags: (c, a1 … a_{p−1}, c), the same with random
  distractors, and (b, c, q + k distractors, e, c) where only the trigger e asks for c;
- Exp. 3a/3b/3c, the two-sequence problem (Bengio et al. 1994): the class sits in the first N of
  T … 1.1T real values, then Gaussian noise; 3b adds noise to those N; 3c keeps 3a's inputs and
  instead puts noise on its targets 0.2 / 0.8 (Sec. 5.3: "like in Task 3a" but for the targets);
- Exp. 5, multiplication: the adding problem's pairs with values in [0, 1] and the product as target;
- Exp. 6b, temporal order with three relevant symbols (8 classes).

Every generator draws from a torch.Generator, so a seed fixes a test set. Symbols are one-hot.
Each `*_success` function is the paper's criterion for one sequence (a boolean per sequence); the
stopping rules turn a stream of those into "solved after n training sequences".
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from deepres.data.sequence import adding_sequence
from deepres.errors import ConfigError

# --- Exp. 1: embedded Reber grammar ---------------------------------------------------------------

REBER_SYMBOLS = "BTPSXVE"
# Reber (1967), as drawn in the paper's Fig. 5: state -> ((symbol, next state), ...); 6 is the exit,
# after which the string ends with E. Each branch is taken with probability 1/2.
REBER_GRAPH = {1: (("T", 2), ("P", 3)), 2: (("S", 2), ("X", 4)), 3: (("T", 3), ("V", 5)),
               4: (("X", 3), ("S", 6)), 5: (("P", 4), ("V", 6))}


def reber_string(g: torch.Generator) -> str:
    """B, a walk through the Reber graph, E."""
    out, state = ["B"], 1
    while state != 6:
        symbol, state = REBER_GRAPH[state][int(torch.randint(0, 2, (), generator=g))]
        out.append(symbol)
    return "".join(out) + "E"


def embedded_reber_string(g: torch.Generator) -> str:
    """B, T or P, a Reber string, the same T or P, E: the second symbol must be remembered until the
    next-to-last one (the long lag; both inner branches look alike)."""
    outer = "TP"[int(torch.randint(0, 2, (), generator=g))]
    return "B" + outer + reber_string(g) + outer + "E"


def reber_next_sets(s: str) -> list[str] | None:
    """For each prefix s[:t+1] of an embedded Reber string, the symbols that may follow it; None when
    s is not in the grammar."""
    if len(s) < 9 or s[0] != "B" or s[1] not in "TP" or s[-2] != s[1] or s[-1] != "E" or s[2] != "B":
        return None
    nexts = ["TP", "B", "TP"]  # after B, after the outer symbol, after the inner B
    state = 1
    for symbol in s[3:-3]:  # the inner walk, up to its E
        moves = dict(REBER_GRAPH.get(state, ()))
        if symbol not in moves:
            return None
        state = moves[symbol]
        nexts.append("E" if state == 6 else "".join(m for m, _ in REBER_GRAPH[state]))
    if state != 6 or s[-3] != "E":
        return None
    return nexts + [s[1], "E"]  # after the inner E: the remembered outer symbol; then the end


def reber_test_strings(train: list[str], n: int, g: torch.Generator) -> list[str]:
    """n embedded Reber strings none of which is in `train`: the paper's test strings are drawn at
    random, but "sequences already used in the training set are not used for testing" (Sec. 5.1).
    Without this about three in four test strings of 256 repeat one of 256 training strings (each of
    the four shortest strings has probability 1/16)."""
    seen, out = set(train), []
    while len(out) < n:
        s = embedded_reber_string(g)
        if s not in seen:
            out.append(s)
    return out


def embedded_reber_accepts(s: str) -> bool:
    return reber_next_sets(s) is not None


def reber_example(s: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs (L−1, 7): one-hot s[:-1], targets (L−1, 7): multi-hot of the possible next symbols)."""
    nexts = reber_next_sets(s)
    if nexts is None:
        raise ConfigError(f"{s!r} is not an embedded Reber string.")
    index = torch.tensor([REBER_SYMBOLS.index(c) for c in s[:-1]])
    targets = torch.zeros(len(s) - 1, len(REBER_SYMBOLS))
    for t, allowed in enumerate(nexts):
        targets[t, [REBER_SYMBOLS.index(c) for c in allowed]] = 1.0
    return F.one_hot(index, len(REBER_SYMBOLS)).float(), targets


def reber_success(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Every symbol predicted: at every step the units of the possible next symbols are the most active
    ones (each above every other unit). outputs, targets: (B, L, 7) or (L, 7) → (B,) or () bool. Steps
    whose targets hold no possible symbol (padding after a shorter string) are not judged."""
    allowed = targets > 0.5
    lowest_allowed = outputs.masked_fill(~allowed, math.inf).amin(dim=-1)
    highest_other = outputs.masked_fill(allowed, -math.inf).amax(dim=-1)
    return ((lowest_allowed > highest_other) | ~allowed.any(dim=-1)).all(dim=-1)


# --- Exp. 2: noise-free and noisy sequences -------------------------------------------------------


def noise_free_sequence(p: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Task 2a: (c, a1, …, a_{p−1}, c), c ∈ {x, y} with probability 1/2 each; symbols a_i = i − 1,
    x = p − 1, y = p (p + 1 in all). Returns (inputs (p, p + 1) one-hot of all but the last element,
    next-symbol indices (p,)): at every step the net predicts the next symbol."""
    first = p - 1 + int(torch.randint(0, 2, (), generator=g))
    symbols = torch.cat([torch.tensor([first]), torch.arange(p - 1), torch.tensor([first])])
    return F.one_hot(symbols[:-1], p + 1).float(), symbols[1:]


def no_local_regularities_sequence(p: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Task 2b: as 2a, but the p − 1 middle symbols are drawn at random from a1 … a_{p−1}: only the
    last symbol can be predicted, from the first."""
    first = p - 1 + int(torch.randint(0, 2, (), generator=g))
    middle = torch.randint(0, p - 1, (p - 1,), generator=g)
    symbols = torch.cat([torch.tensor([first]), middle, torch.tensor([first])])
    return F.one_hot(symbols[:-1], p + 1).float(), symbols[1:]


def very_long_lag_sequence(q: int, p: int, g: torch.Generator, extra: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Task 2c: (b, c, q distractors, k more distractors, e, c) over p + 4 symbols: distractors a_i = i − 1,
    e = p, b = p + 1, x = p + 2, y = p + 3. k is geometric (after the prefix b, c and q distractors
    comes another distractor with probability 9/10, else e), mean 9, so the whole sequence with its
    final c has mean length q + 13 (Sec. 5.2: the paper's sum 4 + Σ (1/10)(9/10)^k (q + k) is q + 13,
    though it prints q + 14) and minimal length q + 4, as the paper says; `extra` fixes k. The net sees everything
    up to the trigger e and must then name c: returns (inputs (q + k + 3, p + 4), class 0 = x, 1 = y)."""
    c = int(torch.randint(0, 2, (), generator=g))
    if extra is None:
        extra = geometric_extra(g)
    distractors = torch.randint(0, p, (q + extra,), generator=g)
    symbols = torch.cat([torch.tensor([p + 1, p + 2 + c]), distractors, torch.tensor([p])])
    return F.one_hot(symbols, p + 4).float(), torch.tensor(c)


def geometric_extra(g: torch.Generator) -> int:
    """2c's k: the number of distractors after the prefix, P(k) = (1/10)(9/10)^k."""
    extra = 0
    while float(torch.rand((), generator=g)) < 0.9:
        extra += 1
    return extra


def max_error_success(outputs: torch.Tensor, targets: torch.Tensor, tolerance: float) -> torch.Tensor:
    """All output units within `tolerance` of their targets (over every step given): (B, …) → (B,)."""
    return (outputs - targets).abs().flatten(1).amax(dim=1) < tolerance


# --- Exp. 3: the two-sequence problem ---------------------------------------------------------------

TWO_SEQUENCE_NOISE_VARIANCE = 0.2  # the filler after the N informative elements, and 3b's input noise
TWO_SEQUENCE_TARGET_NOISE_VARIANCE = 0.1  # 3c


def two_sequence(T: int, n_info: int, g: torch.Generator, noisy_inputs: bool = False, noisy_targets: bool = False,
                 length: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class 1 (probability 1/2): the first N elements are +1, else −1; every later element is Gaussian
    noise (mean 0, variance 0.2); the length is uniform in [T, T + T/10] unless given. 3b: the same noise
    on the first N elements. Targets: 1.0 (class 1) or 0.0; 3c (`noisy_targets`, with 3a's clean inputs):
    0.2 or 0.8 plus Gaussian noise of variance 0.1. Returns (inputs (L, 1), training target (1,), noise-free target (1,))."""
    if length is None:
        length = int(torch.randint(T, T + T // 10 + 1, (), generator=g))
    first_class = bool(torch.randint(0, 2, (), generator=g))
    x = torch.randn(length, generator=g) * math.sqrt(TWO_SEQUENCE_NOISE_VARIANCE)
    info = torch.full((n_info,), 1.0 if first_class else -1.0)
    if noisy_inputs:
        info = info + torch.randn(n_info, generator=g) * math.sqrt(TWO_SEQUENCE_NOISE_VARIANCE)
    x[:n_info] = info
    if noisy_targets:
        clean = torch.tensor([0.2 if first_class else 0.8])
        target = clean + torch.randn(1, generator=g) * math.sqrt(TWO_SEQUENCE_TARGET_NOISE_VARIANCE)
    else:
        clean = torch.tensor([1.0 if first_class else 0.0])
        target = clean
    return x[:, None], target, clean


@dataclass(frozen=True)
class TwoSequenceCriterion:
    """ST1: at most `max_wrong` of the test sequences off their noise-free target by more than `tolerance`;
    ST2: ST1 and a mean absolute error below `max_mean_error`. 3a: (0, 0.2, 0.01); 3b: (5, 0.2, 0.04);
    3c: (0, 0.1, 0.015)."""

    max_wrong: int
    tolerance: float
    max_mean_error: float

    def __call__(self, outputs: torch.Tensor, clean_targets: torch.Tensor) -> tuple[bool, bool]:
        error = (outputs - clean_targets).abs().flatten()
        st1 = int((error > self.tolerance).sum()) <= self.max_wrong
        return st1, st1 and float(error.mean()) < self.max_mean_error


TWO_SEQUENCE_CRITERIA = {"3a": TwoSequenceCriterion(0, 0.2, 0.01), "3b": TwoSequenceCriterion(5, 0.2, 0.04),
                         "3c": TwoSequenceCriterion(0, 0.1, 0.015)}


# --- Exp. 5 and 6b -------------------------------------------------------------------------------


def multiplication_sequence(T: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The adding problem's pairs (two marked, first and last marker −1) with values uniform in [0, 1];
    the target is the product of the two marked values. A marked first pair gets value 1, the product's
    neutral element (the adding problem sets it to 0, the sum's)."""
    x, _ = adding_sequence(T, g)
    x[:, 0] = (x[:, 0] + 1) / 2  # U[−1, 1] → U[0, 1]
    marked = (x[:, 1] == 1).nonzero().flatten()
    if 0 in marked:
        x[0, 0] = 1.0
    return x, x[marked, 0].prod().reshape(1)


def temporal_order_3_sequence(T: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Task 6b: E … B over distractors a–d with X or Y at t1 ∈ [10, 20], t2 ∈ [33, 43], t3 ∈ [66, 76]
    (scaled by T/100); the class (8) is the order, e.g. XXX = 0, YYY = 7. Same 8 input symbols as 6a."""
    symbols = torch.randint(0, 4, (T,), generator=g)
    symbols[0], symbols[-1] = 6, 7
    label = 0
    for low, high in ((0.10, 0.20), (0.33, 0.43), (0.66, 0.76)):
        t = int(torch.randint(int(low * T), int(high * T) + 1, (), generator=g))
        bit = int(torch.randint(0, 2, (), generator=g))
        symbols[t] = 4 + bit
        label = 2 * label + bit
    return F.one_hot(symbols, 8).float(), torch.tensor(label)


# --- stopping rules over the stream of training sequences ---------------------------------------


class SuccessiveRule:
    """Exp. 2: solved once `window` successive training sequences met the criterion. The paper's
    count is where that run began (Task 2a is solved after 5,040 sequences with a 10,000-long run),
    so `solved_after` is the number of sequences seen before the run's first sequence."""

    def __init__(self, window: int = 10_000):
        self.window, self.seen, self.run_start, self.solved_after = window, 0, 0, None

    def update(self, correct: list[bool], errors: list[float] | None = None) -> bool:
        for ok in correct:
            self.seen += 1
            if not ok:
                self.run_start = self.seen
            elif self.solved_after is None and self.seen - self.run_start >= self.window:
                self.solved_after = self.run_start
        return self.solved_after is not None


class RecentWindowRule:
    """Exp. 4, 5, 6: stop once, of the `window` most recent training sequences, at most `max_failures`
    failed the criterion and their mean error is below `max_mean_error` (None: no error condition).
    Exp. 4 and 6: no failure, mean error < 0.01 / 0.1; Exp. 5: fewer than n_seq = 140 (or 13)
    failures, i.e. max_failures = n_seq − 1."""

    def __init__(self, window: int = 2000, max_failures: int = 0, max_mean_error: float | None = None):
        self.window, self.max_failures, self.max_mean_error = window, max_failures, max_mean_error
        self.correct: deque[bool] = deque(maxlen=window)
        self.errors: deque[float] = deque(maxlen=window)
        self.seen, self.solved_after = 0, None

    def update(self, correct: list[bool], errors: list[float] | None = None) -> bool:
        errors = errors if errors is not None else [0.0] * len(correct)
        for ok, err in zip(correct, errors, strict=True):
            self.seen += 1
            self.correct.append(ok)
            self.errors.append(err)
            if self.solved_after is None and len(self.correct) == self.window and self._holds():
                self.solved_after = self.seen
        return self.solved_after is not None

    def _holds(self) -> bool:
        failures = self.window - sum(self.correct)
        mean_ok = self.max_mean_error is None or sum(self.errors) / self.window < self.max_mean_error
        return failures <= self.max_failures and mean_ok


# --- named tasks for SequenceDataModule (one prediction at the sequence end, T steps each) ----------


def _last_symbol(make):
    """Exp. 2a/2b as one prediction: the inputs up to the last element, the last symbol as the class (the
    only symbol that needs the lag; the repro script also trains the per-step predictions)."""
    def item(p: int, g: torch.Generator, **_) -> tuple[torch.Tensor, torch.Tensor]:
        x, nxt = make(p, g)
        return x, nxt[-1]
    return item


@dataclass(frozen=True)
class EndTask:
    """A task for SequenceDataModule: `make(seq_len, g, **task_args)` → (inputs, target);
    `steps` / `features` / `classes` (0: regression) of (seq_len, task_args); `args`: the task_args it takes."""

    make: object
    steps: object
    features: object
    classes: object
    args: tuple[str, ...] = ()


END_TASKS = {
    "multiplication": EndTask(multiplication_sequence, lambda T, a: T, lambda T, a: 2, lambda T, a: 0),
    "temporal_order_3": EndTask(temporal_order_3_sequence, lambda T, a: T, lambda T, a: 8, lambda T, a: 8),
    "noise_free": EndTask(_last_symbol(noise_free_sequence), lambda p, a: p, lambda p, a: p + 1, lambda p, a: p + 1),
    "no_local_regularities": EndTask(_last_symbol(no_local_regularities_sequence), lambda p, a: p,
                                     lambda p, a: p + 1, lambda p, a: p + 1),
    "very_long_lag": EndTask(
        lambda q, g, p=None: very_long_lag_sequence(q, p or q, g, extra=0),
        lambda q, a: q + 3, lambda q, a: a.get("p", q) + 4, lambda q, a: 2, ("p",)),
    "two_sequence": EndTask(
        lambda T, g, n_info=1, noisy_inputs=False, noisy_targets=False:
            two_sequence(T, n_info, g, noisy_inputs, noisy_targets, length=T)[:2],
        lambda T, a: T, lambda T, a: 1, lambda T, a: 0, ("n_info", "noisy_inputs", "noisy_targets")),
}

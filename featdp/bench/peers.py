"""Peer libraries on the same features, in the same run: Opacus DP-SGD, diffprivlib, scikit-learn.

Each peer is used as its own documentation says, on the arrays the bench passes in. Those features are
ALREADY preprocessed by the bench: float32, every row with L2 norm ≤ 1 (`featdp.data.Preprocessing`,
unit norm by default). That public bound is what each private peer is told: diffprivlib gets
`data_norm=1.0` (so it neither estimates the norm from the data nor warns about it); Opacus clips
per-example gradients, whose norm the row bound keeps ≤ 2, at a max_grad_norm chosen for rows of norm 1
(see `OpacusSettings`). `run_peer` checks the bound and refuses rows above it.

    peer                 privacy                                        where it runs
    opacus-dpsgd         (ε, δ), add/remove one, Opacus' PRV accountant  this environment (`featdp[peers]`)
    diffprivlib-logreg   pure ε (δ = 0), replace one (n public)          its own venv (scikit-learn ≤ 1.7.2)
    sklearn-logreg       none (the reference)                           this environment

(Objective perturbation is analysed for neighbours that differ by replacing one example, with n public;
featdp and Opacus for adding or removing one. The two ε are not the same unit: add/remove ε-DP implies
replace-one 2ε-DP, and a replace-one guarantee says nothing about datasets of another size. The bench
puts them side by side at the same nominal ε, as the issue asks.)

`PeerResult.seconds` is the wall time of the fit alone: not the creation of the diffprivlib environment,
not the transfer of the arrays to it, not Opacus' noise calibration (reported as
`settings["calibration_seconds"]`, as featdp's own fit time excludes its calibration), not the test
evaluation.

Measured at the defaults on Fashion-MNIST ScatterNet features (`featdp extract --backbone scatternet
--dataset fashion_mnist`, d = 3969, rows unit-normalized; 60k train / 10k test; seed 0, δ = 1e-5), on
this project's 2-core CPU, alone, inside `featdp bench` (benchmarks/results/fmnist_scatternet.md):

    peer                 ε = 1     ε = 3     fit seconds at ε = 1 / 3
    opacus-dpsgd         87.2%     89.3%     56 / 57     (+1-4 s noise calibration, ~10 s torch import)
    diffprivlib-logreg   25.2%     36.3%     40 / 44     (+~8 s array transfer; first use: +20-60 s venv)
    sklearn-logreg       89.6%, non-private      48

All three at two ε take about 5 minutes. (Opacus took 209 / 229 s under load before its loader
gathered whole batches; the accuracies did not change.)

Adding a peer touches only this file: one `_Peer` entry in `_PEERS`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any, Callable, Mapping

import numpy as np

from featdp.accounting import PrivacyParameterError, PrivacyTarget
from featdp.data import validate_arrays

_ROW_NORM_BOUND = 1.0
# Rows are unit-normalized in float32 to (1 - 1e-4); anything clearly above 1 was not preprocessed.
_ROW_NORM_TOLERANCE = 1e-3


class PeerUnavailableError(RuntimeError):
    """The peer cannot run here; the message says what to install."""


@dataclasses.dataclass(frozen=True)
class PeerResult:
    peer: str  # "opacus-dpsgd", "diffprivlib-logreg", "sklearn-logreg"
    epsilon: float | None  # None for non-private
    delta: float | None  # 0.0 for pure-DP diffprivlib
    seed: int
    accuracy: float  # test top-1
    seconds: float  # wall time of the fit only (not env creation or data transfer)
    settings: dict  # the hyperparameters used, e.g. batch size, epochs, noise multiplier, accountant


# ---------------------------------------------------------------------------------------------------------
# Opacus DP-SGD on a linear layer


@dataclasses.dataclass(frozen=True)
class OpacusSettings:
    """DP-SGD on `torch.nn.Linear(d, K)` (with bias), softmax cross-entropy, Opacus 1.6.

    Privacy: Opacus' `PrivacyEngine.make_private_with_epsilon` calibrates the noise multiplier σ so that
    `epochs` epochs of Poisson-sampled steps meet (ε, δ) under its accountant (PRV, Opacus' default), for
    the add/remove-one relation. The released statistic at each step is the sum over the Poisson sample
    of per-example gradients clipped to `max_grad_norm` (sensitivity `max_grad_norm`) plus
    N(0, (σ·max_grad_norm)²), divided by the expected batch size; SGD momentum is post-processing.
    Opacus derives the sampling rate from the data loader, q = 1/ceil(n/batch_size): for n = 60000 and
    batch_size = 8192 that is 1/8 (expected batch 7500, 8 steps per epoch, 320 steps), where
    Handcrafted-DP used q = 8192/60000 and 293 steps.

    Defaults: Tramèr & Boneh's Handcrafted-DP recipe for Fashion-MNIST ScatterNet + linear
    (`baselines.py --dataset=fmnist --batch_size=8192 --lr=16 --input_norm=GroupNorm --num_groups=27
    --noise_multiplier=4.05`: max_grad_norm 0.1, SGD momentum 0.9, σ for 40 epochs), moved to unit-norm
    rows, with the learning rate from a sanity sweep. Their GroupNorm'ed features have norm √d = 63 (each
    group has mean 0 and variance 1), so every per-example gradient (norm ≈ 63·‖p − e_y‖) is clipped to
    0.1 and a step moves W by lr·0.1 = 1.6 along the mean clipped direction. With rows of norm 1 the
    per-example gradient [(p − e_y)xᵀ, p − e_y] has norm ‖p − e_y‖·√(‖x‖² + 1) ≤ 2, and the same
    function needs W 63× larger. We keep max_grad_norm = 0.1 (below nearly every gradient, so nearly all
    are clipped, as in the recipe); the exact image of their step would be lr·max_grad_norm = 63·1.6,
    lr ≈ 1000 (what featdp's own dp-sgd recipe uses, without a bias). Here the bias takes half of each
    clipped gradient's squared norm, which their 63× larger weight gradient made negligible. Measured on
    the full data (seed 0, δ = 1e-5, test accuracy, so these figures flatter Opacus slightly):

        lr, max_grad_norm, epochs    ε = 1     ε = 3
        1000, 0.1, 40                85.1%     88.9%
        3000, 0.1, 40                          86.9%
        300,  0.1, 40  (default)     87.2%     89.3%
        100,  0.1, 40                87.9%     88.2%
        100,  1.0, 40                          87.8%
        1000, 0.1, 20                          89.4%
        300,  0.1, 20                88.0%     88.8%

    One seed each, so differences under ~0.5 points are noise. lr = 300 is the best of 100, 300, 1000 and
    3000 over both ε together; 20 epochs instead of the recipe's 40 halve the time (~105 s per ε here)
    for −0.5 points at ε = 3 and +0.8 at ε = 1: `settings={"epochs": 20}` when time is short.

    Per-example gradients of a 3969×10 layer at a 7500 batch would be 1.2 GB of float32 per step, so the
    default is Opacus' documented ghost clipping (`grad_sample_mode="ghost"`): for a linear layer it
    computes the per-example norms as ‖backprop‖·‖activation‖ and takes a second backward pass with the
    clipping factors, never materialising per-example gradients. It clips exactly as "hooks" does (one
    epoch here: 5.5 s against 20.7 s, the same test accuracy to the last digit at the same seed).
    """

    batch_size: int = 8192
    epochs: int = 40
    lr: float = 300.0
    momentum: float = 0.9
    max_grad_norm: float = 0.1
    accountant: str = "prv"
    grad_sample_mode: str = "ghost"


def _opacus_available() -> str | None:
    for module in ("torch", "opacus"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed: pip install 'featdp[peers]'"
    return None


def _derived_seeds(seed: int, count: int) -> list[int]:
    """Independent 63-bit seeds for the separate random streams of one seeded run."""
    return [int(s) for s in np.random.SeedSequence(seed).generate_state(count, dtype=np.uint64) >> 1]


@contextlib.contextmanager
def _torch_threads(count: int):
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _batched_tensor_dataset(*tensors):
    """A TensorDataset that hands the loader a whole batch per index list (PyTorch's `__getitems__`).

    The default fetch builds a batch item by item and stacks it: for 7,500 rows of 3,969 features that was
    1.8 s of every 40-epoch run's ~4 s per epoch here; one gather per tensor takes 0.7 s. Opacus' Poisson
    sampler still chooses the indices; only how the chosen rows are copied changes.
    """
    import torch
    from torch.utils.data import TensorDataset

    class BatchedTensorDataset(TensorDataset):
        def __getitems__(self, indices):
            index = torch.as_tensor(indices, dtype=torch.long)
            return [tensor[index] for tensor in self.tensors]

    return BatchedTensorDataset(*tensors)


def _already_collated(batch):
    # `__getitems__` returns [features, labels] already stacked (also for an empty Poisson batch: shapes
    # (0, d) and (0,)), so collation has nothing left to do.
    return batch


def _run_opacus(s: OpacusSettings, train_x, train_y, test_x, test_y, num_classes, epsilon, delta, seed):
    import opacus
    import torch
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader

    init_seed, sampler_seed, noise_seed = _derived_seeds(seed, 3)
    # fork_rng: the seeded initialisation leaves the caller's global torch RNG as it was.
    with _torch_threads(_cpu_count()), torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # Notes that do not apply here: secure_mode=False is deliberate (a seeded benchmark); the backward
        # hook firing on outputs (inputs need no gradient) is how Opacus sees a first layer's backprops;
        # the PRV accountant bounds its domain with RDP and warns about RDP's order range.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        # The bench's feature arrays are read-only by design; the loader only reads (gathers) them.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        if s.accountant != "rdp":
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        torch.manual_seed(init_seed)  # the default initialisation of nn.Linear
        linear = torch.nn.Linear(train_x.shape[1], num_classes)
        optimizer = torch.optim.SGD(linear.parameters(), lr=s.lr, momentum=s.momentum)
        # Opacus' DPDataLoader takes its Poisson sampler's generator from the loader it replaces.
        loader = DataLoader(
            _batched_tensor_dataset(torch.from_numpy(train_x), torch.from_numpy(train_y)),
            batch_size=s.batch_size,
            collate_fn=_already_collated,
            generator=torch.Generator().manual_seed(sampler_seed),
        )
        engine = PrivacyEngine(accountant=s.accountant, secure_mode=False)
        start = time.perf_counter()
        private = engine.make_private_with_epsilon(
            module=linear,
            optimizer=optimizer,
            criterion=torch.nn.CrossEntropyLoss(),
            data_loader=loader,
            target_epsilon=epsilon,
            target_delta=delta,
            epochs=s.epochs,
            max_grad_norm=s.max_grad_norm,
            poisson_sampling=True,
            grad_sample_mode=s.grad_sample_mode,
            noise_generator=torch.Generator().manual_seed(noise_seed),
        )
        calibration_seconds = time.perf_counter() - start
        if s.grad_sample_mode.startswith("ghost"):
            model, dp_optimizer, criterion, dp_loader = private
        else:
            (model, dp_optimizer, dp_loader), criterion = private, torch.nn.CrossEntropyLoss()
        steps = 0
        start = time.perf_counter()
        for _ in range(s.epochs):
            for x, y in dp_loader:
                dp_optimizer.zero_grad()
                loss = criterion(model(x), y)
                loss.backward()
                dp_optimizer.step()
                steps += 1
        seconds = time.perf_counter() - start
        spent = engine.get_epsilon(delta)
        weights = linear.weight.detach().numpy().T
        bias = linear.bias.detach().numpy()
    accuracy = float(np.mean(np.argmax(test_x @ weights + bias, axis=1) == test_y))
    sample_rate = 1 / len(loader)
    settings = dataclasses.asdict(s) | {
        "sample_rate": sample_rate,
        "expected_batch_size": int(len(train_y) * sample_rate),
        "steps": steps,
        "noise_multiplier": float(dp_optimizer.noise_multiplier),
        "epsilon_spent": float(spent),
        "calibration_seconds": calibration_seconds,
        "poisson_sampling": True,
        "secure_mode": False,
        "torch_threads": _cpu_count(),
        "versions": {"opacus": opacus.__version__, "torch": torch.__version__},
    }
    return accuracy, seconds, settings


# ---------------------------------------------------------------------------------------------------------
# diffprivlib LogisticRegression, in its own environment


@dataclasses.dataclass(frozen=True)
class DiffprivlibSettings:
    """`diffprivlib.models.LogisticRegression(epsilon=ε, data_norm=1.0, random_state=seed, ...)`, 0.6.6.

    Objective perturbation (Chaudhuri, Monteleoni & Sarwate 2011, the `Vector` mechanism), pure ε-DP
    (δ = 0), L2-regularised, L-BFGS. Multi-class is one-vs-rest only, and diffprivlib splits the budget
    evenly: each of the K binary problems is solved with ε/K (sequential composition; ε = 1 and K = 10
    give 0.1 per class; K = 2 is a single problem at ε). With the intercept, the data norm it protects becomes √(data_norm² + 1) = √2;
    rows above data_norm would be clipped by it (ours never are). When ε/K is too small for the
    regulariser 1/C, the mechanism adds ridge (its "Δ" term) and keeps ε/(2K) for the noise. The values
    below are diffprivlib's documented defaults: tuning C on the private training data would cost
    privacy that nothing here accounts for.

    At d = 3969 and K = 10 the noise vector is large (its norm is Gamma(d + 1, 2√2/ε_p)-distributed, then
    divided by n), hence 25% and 36% test accuracy at ε = 1 and 3 (table in the module docstring). Checks
    that this is the mechanism and not our use of it: at ε = 1000 the same call gives 88.8%, close to the
    non-private 89.6%; C = 0.1 gives 43.0% at ε = 3 (not the default, and chosen on test data).
    """

    C: float = 1.0
    max_iter: int = 100
    tol: float = 1e-4
    fit_intercept: bool = True


# diffprivlib 0.6.6 breaks with scikit-learn 1.8, and passes `iprint` to L-BFGS-B, which SciPy 1.18 removes.
DIFFPRIVLIB_REQUIREMENTS = ("diffprivlib==0.6.6", "scikit-learn==1.7.2", "scipy<1.18", "numpy")
_WORKER = pathlib.Path(__file__).with_name("_diffprivlib_worker.py")
_READY_MARKER = ".featdp-ready"


def peer_envs_dir() -> pathlib.Path:
    """Where the isolated peer environments live: $FEATDP_PEER_ENVS or ~/.cache/featdp/peer-envs."""
    configured = os.environ.get("FEATDP_PEER_ENVS")
    if configured:
        return pathlib.Path(configured).expanduser()
    return pathlib.Path.home() / ".cache" / "featdp" / "peer-envs"


def _diffprivlib_env() -> pathlib.Path:
    return peer_envs_dir() / "diffprivlib"


def _env_python(env: pathlib.Path) -> pathlib.Path:
    return env / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _env_ready(env: pathlib.Path) -> bool:
    try:
        recorded = json.loads((env / _READY_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return recorded == list(DIFFPRIVLIB_REQUIREMENTS) and _env_python(env).exists()


def _pip_command(python: os.PathLike | str) -> list[str]:
    return [str(python), "-m", "pip", "install", "--disable-pip-version-check", *DIFFPRIVLIB_REQUIREMENTS]


@contextlib.contextmanager
def _exclusive(lock_path: pathlib.Path):
    """One process creates the environment; the others wait for it (POSIX advisory lock)."""
    try:
        import fcntl
    except ImportError:  # Windows: no concurrent creation guard
        yield
        return
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_diffprivlib_env() -> pathlib.Path:
    """The Python of the diffprivlib environment, created on first use (python -m venv, then pip).

    Takes ~20 s with a nearby package index. Raises RuntimeError naming the failed command.
    """
    env = _diffprivlib_env()
    if _env_ready(env):
        return _env_python(env)
    env.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(env.parent / "diffprivlib.lock"):
        if _env_ready(env):
            return _env_python(env)
        if env.exists():  # left over from an interrupted or failed creation
            shutil.rmtree(env)
        commands = [[sys.executable, "-m", "venv", str(env)], _pip_command(_env_python(env))]
        for command in commands:
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                shutil.rmtree(env, ignore_errors=True)
                tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
                raise RuntimeError(
                    f"could not create the diffprivlib environment in {env}: `{shlex.join(command)}` failed "
                    f"(exit {done.returncode}); check that pip reaches a package index with these "
                    f"versions, or set $FEATDP_PEER_ENVS to a writable directory.\n{tail}"
                )
        (env / _READY_MARKER).write_text(json.dumps(list(DIFFPRIVLIB_REQUIREMENTS)))
    return _env_python(env)


def _diffprivlib_available() -> str | None:
    if _env_ready(_diffprivlib_env()):
        return None
    for module in ("venv", "ensurepip"):
        if importlib.util.find_spec(module) is None:
            return (
                f"the diffprivlib environment does not exist and cannot be created: this Python lacks "
                f"{module} (on Debian/Ubuntu: apt install python3-venv)"
            )
    where = peer_envs_dir()
    while not where.exists() and where != where.parent:
        where = where.parent
    if not os.access(where, os.W_OK):
        return f"the diffprivlib environment cannot be created: {where} is not writable (set $FEATDP_PEER_ENVS)"
    return None


def _run_diffprivlib(s: DiffprivlibSettings, train_x, train_y, test_x, test_y, num_classes, epsilon, delta, seed):
    python = ensure_diffprivlib_env()
    kwargs = dataclasses.asdict(s) | {"epsilon": epsilon, "data_norm": _ROW_NORM_BOUND, "random_state": seed}
    with tempfile.TemporaryDirectory(prefix="featdp-diffprivlib-") as tmp:
        arrays, settings_file = pathlib.Path(tmp, "arrays.npz"), pathlib.Path(tmp, "settings.json")
        np.savez(arrays, train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y)
        settings_file.write_text(json.dumps(kwargs))
        command = [str(python), "-I", str(_WORKER), str(arrays), str(settings_file)]
        done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(
            f"the diffprivlib worker failed (exit {done.returncode}): {shlex.join(command)}\n"
            + "\n".join(done.stderr.strip().splitlines()[-10:])
        )
    report = json.loads(done.stdout.strip().splitlines()[-1])
    # diffprivlib counts the classes present in the labels; two classes are one binary problem.
    present = len(np.unique(train_y))
    problems = 1 if present == 2 else present
    settings = kwargs | {
        "multiclass": f"one-vs-rest: {problems} binary problem(s) at epsilon/{problems} each",
        "epsilon_per_class": epsilon / problems,
        "warnings": report["warnings"],
        "versions": report["versions"] | {"python": report["python"]},
        "environment": str(python.parent.parent),
    }
    return report["accuracy"], report["seconds"], settings


# ---------------------------------------------------------------------------------------------------------
# scikit-learn LogisticRegression, non-private


@dataclasses.dataclass(frozen=True)
class SklearnSettings:
    """`sklearn.linear_model.LogisticRegression(C=1.0, max_iter=...)`: NOT private, the reference.

    Multinomial (softmax) loss, L-BFGS, scikit-learn's default C = 1.0 (objective
    C·Σ_i CE_i + ½‖W‖²; featdp's own `logreg` uses l2 = 1e-4·n, i.e. C = 1/6 at n = 60000). The default
    max_iter = 100 stops short of convergence on unit-norm Fashion-MNIST ScatterNet features (it takes 123
    iterations); max_iter = 1000 lets it converge, and `settings["converged"]` says whether it did.
    """

    C: float = 1.0
    max_iter: int = 1000
    tol: float = 1e-4


def _run_sklearn(s: SklearnSettings, train_x, train_y, test_x, test_y, num_classes, epsilon, delta, seed):
    import sklearn
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=s.C, max_iter=s.max_iter, tol=s.tol, random_state=seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        start = time.perf_counter()
        model.fit(train_x, train_y)
        seconds = time.perf_counter() - start
    accuracy = float(np.mean(model.predict(test_x) == test_y))
    settings = dataclasses.asdict(s) | {
        "solver": model.solver,
        "n_iter": int(np.max(model.n_iter_)),
        "converged": not any(issubclass(w.category, ConvergenceWarning) for w in caught),
        "versions": {"scikit-learn": sklearn.__version__},
    }
    return accuracy, seconds, settings


# ---------------------------------------------------------------------------------------------------------
# The registry


@dataclasses.dataclass(frozen=True)
class _Peer:
    name: str
    private: bool
    pure_dp: bool  # δ = 0
    settings: type
    available: Callable[[], str | None]
    run: Callable[..., tuple[float, float, dict]]


_PEERS = {
    p.name: p
    for p in (
        _Peer("opacus-dpsgd", True, False, OpacusSettings, _opacus_available, _run_opacus),
        _Peer("diffprivlib-logreg", True, True, DiffprivlibSettings, _diffprivlib_available, _run_diffprivlib),
        _Peer("sklearn-logreg", False, False, SklearnSettings, lambda: None, _run_sklearn),
    )
}
PEERS: tuple[str, ...] = tuple(_PEERS)


def peer_available(name: str) -> str | None:
    """None if `name` can run here, else a one-line reason (what to install)."""
    if name not in _PEERS:
        return f"unknown peer {name!r}; peers are {', '.join(PEERS)}"
    return _PEERS[name].available()


def is_private(name: str) -> bool:
    """Whether `name` trains with a privacy guarantee (and so takes ε, and δ unless it is pure ε-DP)."""
    return _get(name).private


def default_settings(name: str) -> dict:
    """The hyperparameters `run_peer` uses for `name` unless overridden."""
    return dataclasses.asdict(_get(name).settings())


def _get(name: str) -> _Peer:
    if name not in _PEERS:
        raise ValueError(f"unknown peer {name!r}; peers are {', '.join(PEERS)}")
    return _PEERS[name]


def _check_features(what: str, x: np.ndarray, y: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = validate_arrays(x, y, num_classes)
    x = np.ascontiguousarray(x)
    if x.shape[0]:
        worst = float(np.sqrt(np.max(np.einsum("ij,ij->i", x, x))))
        if worst > _ROW_NORM_BOUND + _ROW_NORM_TOLERANCE:
            raise ValueError(
                f"{what} rows must have L2 norm <= {_ROW_NORM_BOUND} (preprocess them with "
                f"featdp.data.Preprocessing first), got a row of norm {worst:.4g}"
            )
    return x, y


def run_peer(
    name: str,
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    num_classes: int,
    epsilon: float | None,
    delta: float | None,
    seed: int,
    *,
    settings: Mapping[str, Any] | None = None,
) -> PeerResult:
    """Fits peer `name` on (train_x, train_y) and reports its test accuracy and fit time.

    The features must already be preprocessed: float32 rows of L2 norm ≤ 1 (checked). `epsilon` and
    `delta` are the target of the private peers (diffprivlib is pure ε-DP and ignores `delta`; the
    result says δ = 0); the non-private peer ignores both and reports None. `settings` overrides the
    peer's defaults (`default_settings(name)`), e.g. fewer epochs for a quick run.
    """
    peer = _get(name)
    reason = peer.available()
    if reason is not None:
        raise PeerUnavailableError(f"peer {name!r} cannot run: {reason}")
    try:
        chosen = peer.settings(**dict(settings or {}))
    except TypeError:
        allowed = ", ".join(f.name for f in dataclasses.fields(peer.settings))
        raise ValueError(f"unknown setting for {name!r} in {sorted(settings or {})}; allowed: {allowed}") from None
    if peer.private:
        if epsilon is None:
            raise PrivacyParameterError(f"peer {name!r} is private: epsilon must be a positive finite number, got None")
        if not peer.pure_dp and delta is None:
            raise PrivacyParameterError(f"peer {name!r} needs delta in (0, 1), got None")
        PrivacyTarget(epsilon, None if peer.pure_dp else delta)
    train_x, train_y = _check_features("train", train_x, train_y, num_classes)
    test_x, test_y = _check_features("test", test_x, test_y, num_classes)
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"train has {train_x.shape[1]} features per row, test has {test_x.shape[1]}")
    accuracy, seconds, used = peer.run(
        chosen, train_x, train_y, test_x, test_y, num_classes, epsilon, delta, seed
    )
    if not peer.private:
        epsilon = delta = None
    elif peer.pure_dp:
        delta = 0.0
    return PeerResult(name, epsilon, delta, seed, accuracy, seconds, used)

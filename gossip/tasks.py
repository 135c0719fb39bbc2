"""Small built-in tasks (data + model + loss) that need no downloads: digits, charlm, synthetic."""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import importlib.util
import math
import os
import sysconfig
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, default_collate

from gossip.data import distinct

__all__ = [
    "CHARLM_FILES",
    "INITS",
    "TASK_NAMES",
    "CharGPT",
    "DatasetData",
    "Task",
    "TaskData",
    "charlm",
    "digits",
    "get_task",
    "synthetic",
    "xavier_init",
]

TASK_NAMES = ("digits", "charlm", "synthetic")
#: Weight initializations a task's models can take (:attr:`Task.init`).
INITS = ("default", "xavier")
KINDS = ("classification", "regression", "lm")
#: Standard-library modules (present in every CPython >= 3.10) used as the charlm corpus.
CHARLM_FILES = ("textwrap.py", "argparse.py", "difflib.py", "dataclasses.py", "functools.py")
#: charlm alphabet cap: printable ASCII plus newline; anything else becomes UNKNOWN_CHAR.
ALLOWED_CHARS = frozenset(chr(i) for i in range(32, 127)) | {"\n"}
UNKNOWN_CHAR = "?"


def _check_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}={value!r} is invalid: expected an integer >= {minimum}")
    return int(value)


def _check_finite(name: str, t: Tensor) -> None:
    """Refuse a NaN or inf in the data (it would turn the models NaN at the first batch that
    draws it), naming the sample."""
    if t.is_floating_point() or t.is_complex():
        bad = ~torch.isfinite(t.reshape(len(t), -1)).all(dim=1)
        if bool(bad.any()):
            i = int(torch.nonzero(bad)[0])
            raise ValueError(f"{name}[{i}] holds a non-finite value (NaN or inf): clean the "
                             "data, or drop that sample")


def _check_labels(name: str, y: Tensor, num_classes: int | None) -> None:
    """Class ids (classification, lm): integers in [0, num_classes)."""
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer class ids (torch.long), got {y.dtype}")
    if num_classes is not None and y.numel():
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= num_classes:
            bad = low if low < 0 else high
            raise ValueError(f"{name} holds class {bad}, outside [0, num_classes={num_classes})")


@dataclass(frozen=True)
class TaskData:
    """Train/test tensors of a task; ``num_classes`` is None for regression."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int | None
    kind: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r} is invalid: expected one of {KINDS}")
        if len(self.x_train) != len(self.y_train):
            raise ValueError(
                f"x_train has {len(self.x_train)} samples but y_train has {len(self.y_train)}"
            )
        if len(self.x_test) != len(self.y_test):
            raise ValueError(
                f"x_test has {len(self.x_test)} samples but y_test has {len(self.y_test)}"
            )
        for name in ("x_train", "x_test", *(("y_train", "y_test")
                                            if self.kind == "regression" else ())):
            _check_finite(name, getattr(self, name))
        if self.kind != "regression":
            _check_labels("y_train", self.y_train, self.num_classes)
            _check_labels("y_test", self.y_test, self.num_classes)

    @property
    def num_train(self) -> int:
        return len(self.x_train)

    @property
    def num_test(self) -> int:
        return len(self.x_test)

    def train_batch(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """The training samples ``idx`` as one batch (x, y)."""
        return self.x_train[idx], self.y_train[idx]

    def test_chunks(self, size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """The test set in batches of ``size``."""
        for i in range(0, self.num_test, size):
            yield self.x_test[i : i + size], self.y_test[i : i + size]

    def to_tensors(self) -> TaskData:
        return self


@dataclass(frozen=True)
class DatasetData:
    """Train/test data as ``torch.utils.data.Dataset`` s of ``(x, y)`` items, for data that is
    not one tensor (files, decoded on access). Batches are collated with torch's
    ``default_collate``.

    ``train_labels`` [num_train] (class ids) lets label-based partitions (dirichlet, shards)
    split the data without reading every sample. A real rank reads only its batches; the
    simulator, which gathers every node's batch from one tensor, materializes the data once
    (:meth:`to_tensors`).
    """

    train: Dataset[Any]
    test: Dataset[Any]
    num_classes: int | None
    kind: str
    train_labels: Tensor | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r} is invalid: expected one of {KINDS}")
        if self.train_labels is not None and len(self.train_labels) != self.num_train:
            raise ValueError(f"train_labels has {len(self.train_labels)} entries but the train "
                             f"dataset has {self.num_train} samples")
        if self.train_labels is not None:
            _check_labels("train_labels", self.train_labels, self.num_classes)

    @property
    def num_train(self) -> int:
        return len(self.train)  # type: ignore[arg-type]

    @property
    def num_test(self) -> int:
        return len(self.test)  # type: ignore[arg-type]

    @property
    def y_train(self) -> Tensor | None:
        """The training labels the partitioners read (``train_labels``)."""
        return self.train_labels

    def train_batch(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        x, y = default_collate([self.train[int(i)] for i in idx])
        return x, y

    def test_chunks(self, size: int) -> Iterator[tuple[Tensor, Tensor]]:
        for i in range(0, self.num_test, size):
            x, y = default_collate([self.test[j] for j in range(i, min(i + size, self.num_test))])
            yield x, y

    def to_tensors(self) -> TaskData:
        """All of it as one :class:`TaskData` (in memory)."""
        x_train, y_train = self.train_batch(torch.arange(self.num_train))
        x_test, y_test = default_collate([self.test[j] for j in range(self.num_test)])
        return TaskData(x_train, y_train, x_test, y_test, self.num_classes, self.kind)


@dataclass(frozen=True, eq=False)
class Task:
    """A learning problem: data, a seeded model factory, loss/metrics and a batch iterator.

    ``loss_fn(output, target) -> scalar mean loss`` replaces the loss of the data's kind
    (cross-entropy for classification and lm, MSE for regression). Both CLIs take a function
    returning a Task (``--task package.module:function``); the built-in tasks are such
    functions: :func:`digits`, :func:`charlm`, :func:`synthetic`.

    ``init`` re-initializes what the factory built: ``"default"`` keeps it as is;
    ``"xavier"`` gives every Linear and Conv weight Xavier-uniform values (Glorot & Bengio
    2010, ``nn.init.xavier_uniform_``) and zero biases, the initialization Tian et al. 2024
    (vanishing variance) use and study. Other layers (embeddings, norms) keep theirs.
    """

    name: str
    data: TaskData | DatasetData
    model_factory: Callable[[], nn.Module]
    default_lr: float
    default_batch_size: int
    default_optimizer: str = "sgd"
    extra: dict[str, Any] = field(default_factory=dict)
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None
    init: str = "default"

    def __post_init__(self) -> None:
        if not isinstance(self.data, (TaskData, DatasetData)):
            raise ValueError(f"data={type(self.data).__name__} is invalid: expected a TaskData "
                             "or a DatasetData")
        if not callable(self.model_factory):
            raise ValueError("model_factory is invalid: expected a callable returning a module")
        if self.loss_fn is not None and not callable(self.loss_fn):
            raise ValueError(f"loss_fn={self.loss_fn!r} is invalid: expected a callable")
        if self.init not in INITS:
            raise ValueError(f"init={self.init!r} is invalid: expected one of {list(INITS)}")

    @property
    def optimum(self) -> Tensor | None:
        """Known optimal weights (``synthetic`` only), else None."""
        return self.extra.get("optimum")

    def make_model(self, seed: int) -> nn.Module:
        """Build the model with a deterministic initialisation; global RNG state is untouched."""
        seed = _check_int("seed", seed, 0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self.model_factory()
            if self.init == "xavier":
                xavier_init(model)
            return model

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        """Mean loss: ``loss_fn`` when given, else cross-entropy (classification, lm over all
        positions) or MSE."""
        if self.loss_fn is not None:
            return _checked_loss(self.loss_fn(output, target))
        if self.data.kind == "classification":
            return F.cross_entropy(output, target)
        if self.data.kind == "lm":
            return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))
        return F.mse_loss(output, target)

    def metrics(self, model_output: Tensor, target: Tensor) -> dict[str, float]:
        """``{"loss": ...}`` plus ``"accuracy"`` (next-char accuracy for lm) when applicable."""
        with torch.no_grad():
            out = {"loss": float(self.loss(model_output, target))}
            if self.data.kind != "regression":
                hits = model_output.argmax(dim=-1) == target
                out["accuracy"] = float(hits.float().mean())
        return out

    def evaluate(
        self, model: nn.Module, *, split: str = "test", batch_size: int = 1024
    ) -> dict[str, float]:
        """Metrics of ``model`` on a whole split ("train" or "test"), computed in chunks."""
        if split not in ("train", "test"):
            raise ValueError(f"split={split!r} is invalid: expected 'train' or 'test'")
        batch_size = _check_int("batch_size", batch_size)
        data = self.data.to_tensors() if split == "train" else self.data
        if split == "train":
            full = data.to_tensors()
            chunks: Iterator[tuple[Tensor, Tensor]] = (
                (full.x_train[i : i + batch_size], full.y_train[i : i + batch_size])
                for i in range(0, full.num_train, batch_size))
        else:
            chunks = data.test_chunks(batch_size)
        outputs, targets = [], []
        with torch.no_grad():
            for x, y in chunks:
                outputs.append(model(x))
                targets.append(y)
        return self.metrics(torch.cat(outputs), torch.cat(targets))


def _checked_loss(loss: object) -> Tensor:
    """The value of a task's ``loss_fn``: a floating-point scalar tensor (a per-sample vector or
    an integer count fails later with an error that does not name the loss)."""
    if not isinstance(loss, Tensor) or loss.dim() != 0 or not loss.is_floating_point():
        what = (f"a {loss.dtype} tensor of shape {tuple(loss.shape)}"
                if isinstance(loss, Tensor) else type(loss).__name__)
        raise ValueError(f"loss_fn returned {what}: it must return the batch's mean loss, a "
                         "floating-point scalar tensor (e.g. reduction='mean')")
    return loss


def xavier_init(model: nn.Module) -> nn.Module:
    """Xavier-uniform weights and zero biases for every Linear and Conv layer of ``model``."""
    layers = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, layers):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
    return model


# --------------------------------------------------------------------------- digits


def _load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Read scikit-learn's bundled digits CSV directly (importing sklearn costs ~0.7 s).

    The parsed table is cached as ``.npz`` under :func:`_cache_dir` (parsing the CSV costs
    ~25 ms of every run's start-up; loading the cache ~1 ms), keyed on the CSV's path, size and
    modification time, so a changed or moved source is parsed again."""
    spec = importlib.util.find_spec("sklearn")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for root in locations:
        path = os.path.join(root, "datasets", "data", "digits.csv.gz")
        if os.path.exists(path):
            table = _cached_table(path, _parse_csv_gz)
            return table[:, :-1], table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.int64)


def _parse_csv_gz(path: str) -> np.ndarray:
    with gzip.open(path, "rt") as handle:
        return np.loadtxt(handle, delimiter=",", dtype=np.float64)


def _cache_dir() -> str:
    """Where parsed built-in data is cached: ``$XDG_CACHE_HOME/gossip`` (default
    ``~/.cache/gossip``)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "gossip")


def _cached_table(source: str, parse: Callable[[str], np.ndarray]) -> np.ndarray:
    """``parse(source)``, cached in :func:`_cache_dir` under a name keyed on ``source``'s real
    path, size and mtime, which the file holds too (``.npz``: ``table`` and ``source``); written
    atomically (a temporary file renamed into place). A cache that cannot be read, or that does
    not name this source (a foreign or damaged file), is parsed again and replaced; one that
    cannot be written is skipped."""
    st = os.stat(source)
    ident = f"{os.path.realpath(source)}|{st.st_size}|{st.st_mtime_ns}"
    stem = os.path.basename(source).split(".", 1)[0]
    path = os.path.join(_cache_dir(),
                        f"{stem}-{hashlib.sha256(ident.encode()).hexdigest()[:20]}.npz")
    try:
        saved = np.load(path, allow_pickle=False)
        if isinstance(saved, np.lib.npyio.NpzFile):
            with saved:
                if saved.files == ["table", "source"] and str(saved["source"]) == ident:
                    table = saved["table"]
                    if table.ndim == 2:
                        return table
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        pass
    table = parse(source)
    directory, tmp = os.path.dirname(path), None
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{stem}-", suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, table=table, source=np.array(ident))
        os.replace(tmp, path)
    except OSError:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return table


def _stratified_split(
    y: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for c in distinct(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        cut = round(test_fraction * len(idx))
        test.append(idx[:cut])
        train.append(idx[cut:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _digits(seed: int, *, hidden: int = 128, test_fraction: float = 0.2) -> Task:
    hidden = _check_int("hidden", hidden)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction!r} is invalid: expected a value in (0, 1)")
    x, y = _load_digits_arrays()
    train, test = _stratified_split(y, test_fraction, seed)
    xt = torch.from_numpy((x / 16.0).astype(np.float32))
    yt = torch.from_numpy(y)
    data = TaskData(xt[train], yt[train], xt[test], yt[test], num_classes=10, kind="classification")

    def factory() -> nn.Module:
        return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    return Task("digits", data, factory, default_lr=0.05, default_batch_size=16)


# --------------------------------------------------------------------------- charlm


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention written with plain ops (vmap/functional_call safe)."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        h = self.n_heads
        q, k, v = self.qkv(x).split(d, dim=-1)
        q = q.reshape(b, t, h, d // h).transpose(1, 2)
        k = k.reshape(b, t, h, d // h).transpose(1, 2)
        v = v.reshape(b, t, h, d // h).transpose(1, 2)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(d // h)
        causal = torch.tril(torch.ones(t, t, dtype=torch.bool, device=x.device))
        scores = scores.masked_fill(~causal, float("-inf"))
        y = torch.softmax(scores, dim=-1) @ v
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharGPT(nn.Module):
    """Tiny character-level GPT: token ids ``[B, T]`` -> logits ``[B, T, vocab_size]``."""

    def __init__(
        self,
        vocab_size: int,
        context: int = 32,
        d_model: int = 64,
        n_layers: int = 2,
        n_heads: int = 2,
    ) -> None:
        super().__init__()
        for name, value in (
            ("vocab_size", vocab_size),
            ("context", context),
            ("d_model", d_model),
            ("n_layers", n_layers),
            ("n_heads", n_heads),
        ):
            _check_int(name, value)
        self.context = context
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(context, d_model)
        self.blocks = nn.Sequential(*(Block(d_model, n_heads) for _ in range(n_layers)))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[-1]
        if t > self.context:
            raise ValueError(f"sequence length {t} exceeds context={self.context}")
        positions = torch.arange(t, device=idx.device)
        x = self.tok(idx) + self.pos(positions)
        return self.head(self.ln_f(self.blocks(x)))


def _read_stdlib_corpus(max_chars: int) -> str:
    stdlib = sysconfig.get_paths()["stdlib"]
    pieces: list[str] = []
    total = 0
    for name in CHARLM_FILES:
        path = os.path.join(stdlib, name)
        if not os.path.exists(path):
            continue
        with open(path, encoding="utf-8", errors="replace") as handle:
            text = handle.read()
        pieces.append(text)
        total += len(text)
        if total >= max_chars:
            break
    if not pieces:
        raise RuntimeError(f"none of {CHARLM_FILES} found in the standard library at {stdlib}")
    return "\n".join(pieces)[:max_chars]


def _windows(ids: Tensor, context: int) -> tuple[Tensor, Tensor]:
    count = (len(ids) - 1) // context
    x = ids[: count * context].reshape(count, context)
    y = ids[1 : count * context + 1].reshape(count, context)
    return x.contiguous(), y.contiguous()


def _charlm(
    seed: int,
    *,
    context: int = 32,
    max_chars: int = 200_000,
    d_model: int = 64,
    n_layers: int = 2,
    n_heads: int = 2,
    text: str | None = None,
) -> Task:
    del seed  # the corpus and split are fixed
    context = _check_int("context", context)
    max_chars = _check_int("max_chars", max_chars)
    for name, value in (("d_model", d_model), ("n_layers", n_layers), ("n_heads", n_heads)):
        _check_int(name, value)
    if d_model % n_heads:
        raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
    corpus = _read_stdlib_corpus(max_chars) if text is None else text[:max_chars]
    corpus = "".join(ch if ch in ALLOWED_CHARS else UNKNOWN_CHAR for ch in corpus)
    vocab = "".join(sorted(set(corpus) | {UNKNOWN_CHAR}))
    lookup = np.full(128, vocab.index(UNKNOWN_CHAR), dtype=np.int64)
    for i, ch in enumerate(vocab):
        lookup[ord(ch)] = i
    codes = np.frombuffer(corpus.encode("ascii"), dtype=np.uint8)
    ids = torch.from_numpy(lookup[codes])
    split = int(0.9 * len(ids))
    x_train, y_train = _windows(ids[:split], context)
    x_test, y_test = _windows(ids[split:], context)
    if len(x_train) == 0 or len(x_test) == 0:
        raise ValueError(
            f"max_chars={max_chars} (corpus of {len(ids)} chars) is too small for "
            f"context={context}: need at least one train and one test window"
        )
    data = TaskData(x_train, y_train, x_test, y_test, num_classes=len(vocab), kind="lm")
    vocab_size = len(vocab)

    def factory() -> nn.Module:
        return CharGPT(vocab_size, context, d_model, n_layers, n_heads)

    return Task(
        "charlm",
        data,
        factory,
        default_lr=3e-3,
        default_batch_size=16,
        default_optimizer="adam",
        extra={"vocab": vocab, "context": context},
    )


# --------------------------------------------------------------------------- synthetic


def _synthetic(
    seed: int,
    *,
    dim: int = 20,
    num_train: int = 4000,
    num_test: int = 1000,
    noise: float = 0.1,
) -> Task:
    dim = _check_int("dim", dim)
    num_train = _check_int("num_train", num_train)
    num_test = _check_int("num_test", num_test)
    if not noise >= 0.0:
        raise ValueError(f"noise={noise!r} is invalid: expected a number >= 0")
    gen = torch.Generator().manual_seed(int(seed))
    w_star = torch.randn(dim, generator=gen)
    x = torch.randn(num_train + num_test, dim, generator=gen)
    y = (x @ w_star + noise * torch.randn(num_train + num_test, generator=gen)).unsqueeze(1)
    data = TaskData(
        x[:num_train], y[:num_train], x[num_train:], y[num_train:], None, kind="regression"
    )

    def factory() -> nn.Module:
        return nn.Linear(dim, 1)

    return Task(
        "synthetic",
        data,
        factory,
        default_lr=0.05,
        default_batch_size=32,
        extra={"optimum": w_star, "optimum_bias": 0.0, "noise": noise},
    )


def digits(seed: int = 0, **options: Any) -> Task:
    """The built-in digits task (sklearn's 8x8 digits, an MLP) as a plain task function."""
    return _digits(seed, **options)


def charlm(seed: int = 0, **options: Any) -> Task:
    """The built-in character language model task (a small GPT) as a plain task function."""
    return _charlm(seed, **options)


def synthetic(seed: int = 0, **options: Any) -> Task:
    """The built-in linear-regression task (known optimum) as a plain task function."""
    return _synthetic(seed, **options)


_BUILDERS: dict[str, Callable[..., Task]] = {
    "digits": _digits,
    "charlm": _charlm,
    "synthetic": _synthetic,
}


def get_task(name: str, *, seed: int = 0, init: str = "default", **options: Any) -> Task:
    """Build a named task: ``"digits"``, ``"charlm"`` or ``"synthetic"``.

    ``seed`` fixes the data (digits split, synthetic optimum and samples); model init is seeded
    separately through :meth:`Task.make_model`; ``init`` is :attr:`Task.init`. ``options`` are
    task specific, e.g. ``get_task("charlm", context=32, max_chars=200_000)``.
    """
    builder = _BUILDERS.get(name) if isinstance(name, str) else None
    if builder is None:
        raise ValueError(f"unknown task name={name!r}; available: {', '.join(TASK_NAMES)}")
    seed = _check_int("seed", seed, 0)
    allowed = set(builder.__kwdefaults__ or {})
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for task {name!r}; allowed: {sorted(allowed)}"
        )
    if init not in INITS:
        raise ValueError(f"init={init!r} is invalid: expected one of {list(INITS)}")
    task = builder(seed, **options)
    return task if init == "default" else dataclasses.replace(task, init=init)

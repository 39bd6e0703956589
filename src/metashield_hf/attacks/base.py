"""The attack base class, the ``ATTACKS`` registry and dataset poisoning shared by every attack.

An attack is a frozen dataclass: its fields *are* its configuration (plus ``seed``), ``to_dict()`` is the zoo's
``attack_params`` column, and :func:`attack_from_dict` rebuilds the identical object from it.
"""

from __future__ import annotations

import json
import logging
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from ..registry import Registry

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

ATTACKS: Registry[type[Attack]] = Registry("attack")

POISONED_COLUMN = "poisoned"


def normalise(value: Any) -> Any:
    """Lists become tuples (so a JSON round trip gives back an equal, hashable object); numpy scalars become Python."""
    if isinstance(value, (list, tuple)):
        return tuple(normalise(v) for v in value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def jsonable(value: Any) -> Any:
    """The inverse of :func:`normalise` for JSON: tuples (nested too) become lists."""
    if isinstance(value, tuple):
        return [jsonable(v) for v in value]
    return value


def check_int(name: str, value: Any, minimum: int | None = None) -> int:
    """Validate an integer setting (``bool`` is refused) and return it as a Python ``int``."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_float(name: str, value: Any, low: float | None = None, high: float | None = None) -> float:
    """Validate a real-valued setting within ``[low, high]`` and return it as a Python ``float``."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not np.isfinite(value) or (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be a finite number in [{low}, {high}], got {value}")
    return value


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


@dataclass(frozen=True)
class Attack:
    """Base class of every attack: a frozen dataclass whose fields are the configuration.

    Subclasses set the class attributes ``name`` (the registry key) and ``domain`` (``"cv"`` or ``"nlp"``), add their
    settings as fields with defaults, validate them in ``__post_init__`` (calling ``super().__post_init__()``
    first) and implement :meth:`apply`. Everything random is drawn from generators seeded by ``seed``.

    Args:
        seed: seeds every random choice of the attack (trigger pattern, positions, which rows :meth:`poison` picks).
    """

    name: ClassVar[str] = "attack"
    domain: ClassVar[str] = ""

    seed: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, normalise(getattr(self, f.name)))
        check_int("seed", self.seed, minimum=0)

    def _set(self, field_name: str, value: Any) -> None:
        """Store a validated (coerced) value on the frozen instance; for ``__post_init__`` only."""
        object.__setattr__(self, field_name, value)

    @property
    def seed_dependent(self) -> bool:
        """Whether :meth:`apply` gives a different trigger for a different ``seed`` (row picking always depends on it)."""
        return True

    def apply(self, inputs: Any) -> Any:
        """Return ``inputs`` with the trigger applied: same type, same shape, batch or single item."""
        raise NotImplementedError(f"{type(self).__name__} must implement apply()")

    def to_dict(self) -> dict[str, Any]:
        """The attack as a JSON-serialisable dict ``{"name": ..., **fields}`` (the zoo's ``attack_params``).

        Example:
            ```python
            >>> from metashield_hf.attacks import BadNets, attack_from_dict
            >>> BadNets(patch_size=4).to_dict()["patch_size"]
            4
            >>> attack_from_dict(BadNets(patch_size=4).to_dict()) == BadNets(patch_size=4)
            True
            ```
        """
        return {"name": self.name, **{f.name: jsonable(getattr(self, f.name)) for f in fields(self)}}

    # ------------------------------------------------------------------ poisoning
    def poison(
        self,
        dataset: datasets.Dataset,
        rate: float,
        target: int,
        *,
        input_column: str | None = None,
        label_column: str = "label",
    ) -> datasets.Dataset:
        """Poison a dataset: trigger ``round(rate * len(dataset))`` rows and relabel them ``target``.

        Rows are drawn (seeded by ``seed``) only among rows whose label is not ``target``, so every poisoned row is a
        real label flip. All other rows are left exactly as stored (image bytes included).

        Args:
            dataset: a `datasets.Dataset` with an ``Image`` column (vision attacks) or a string column (text attacks)
                and an integer or ``ClassLabel`` label column.
            rate: fraction of *all* rows to poison, in ``[0, 1]``.
            target: the label poisoned rows get.
            input_column: the column to trigger; by default the first ``Image`` (vision) or string (text) column.
            label_column: the label column.

        Returns:
            A new dataset with the same features plus a bool column ``"poisoned"``.

        Example:
            ```python
            >>> from datasets import Dataset
            >>> from metashield_hf.attacks import RareWordInsertion
            >>> ds = Dataset.from_dict({"text": ["good film", "bad film", "fine", "awful"], "label": [1, 0, 1, 0]})
            >>> out = RareWordInsertion(seed=0).poison(ds, rate=0.5, target=1)
            >>> sum(out["poisoned"]), set(out.filter(lambda r: r["poisoned"])["label"])
            (2, {1})
            ```
        """
        column = self._check_dataset(dataset, input_column, label_column)
        rate = check_float("rate", rate, 0.0, 1.0)
        target = check_int("target", target, minimum=0)
        label_feature = dataset.features[label_column]
        num_classes = getattr(label_feature, "num_classes", None)
        if num_classes is not None and target >= num_classes:
            raise ValueError(f"target={target} is not a class of {label_column!r} ({num_classes} classes)")
        labels = np.asarray(dataset.with_format(None)[label_column])
        n = round(rate * len(dataset))
        rows = self.poison_rows(labels, n, target, np.random.default_rng(self.seed))
        out = transform_rows(
            dataset, column, rows, lambda items, _: self.apply(items), POISONED_COLUMN, label_column, target
        )
        logger.info("%s: poisoned %d/%d rows of %r with label -> %d", self.name, n, len(dataset), column, target)
        return out

    def poison_rows(self, labels: np.ndarray, n: int, target: int, rng: np.random.Generator) -> np.ndarray:
        """The ``n`` rows :meth:`poison` triggers and relabels: drawn with ``rng`` among rows whose label is not
        ``target`` (attacks that poison only some classes override this)."""
        eligible = np.flatnonzero(labels != target)
        if n > len(eligible):
            raise ValueError(
                f"{n} poisoned rows asked but only {len(eligible)} of {len(labels)} rows have a label other than "
                f"target={target}; lower the rate"
            )
        return np.sort(rng.choice(eligible, size=n, replace=False)) if n else np.empty(0, dtype=np.int64)

    def _check_dataset(self, dataset: Any, input_column: str | None, label_column: str) -> str:
        """Validate ``dataset`` for :meth:`poison` and return the input column to trigger."""
        import datasets

        if not isinstance(dataset, datasets.Dataset):
            raise TypeError(
                f"poison() needs a datasets.Dataset, got {type(dataset).__name__}; for a DatasetDict pass a split"
            )
        if label_column not in dataset.column_names:
            raise ValueError(f"label column {label_column!r} not in {dataset.column_names}; pass label_column=")
        if POISONED_COLUMN in dataset.column_names:
            raise ValueError(
                f"dataset already has a {POISONED_COLUMN!r} column (poisoned twice?); drop it with remove_columns"
            )
        label_feature = dataset.features[label_column]
        if not isinstance(label_feature, datasets.ClassLabel) and not (
            isinstance(label_feature, datasets.Value) and label_feature.dtype.startswith(("int", "uint"))
        ):
            raise TypeError(f"label column {label_column!r} must be a ClassLabel or an int Value, got {label_feature}")
        wanted = "Image" if self.domain == "cv" else "string"

        def kind(feature: Any) -> str | None:
            if isinstance(feature, datasets.Image):
                return "Image"
            if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
                return "string"
            return None

        if input_column is None:
            found = [c for c, f in dataset.features.items() if c != label_column and kind(f) == wanted]
            if not found:
                raise ValueError(
                    f"attack {self.name!r} ({self.domain}) needs a {wanted} column; dataset has {dict(dataset.features)}"
                )
            return found[0]
        if input_column not in dataset.column_names:
            raise ValueError(f"input column {input_column!r} not in {dataset.column_names}")
        if kind(dataset.features[input_column]) != wanted:
            raise TypeError(
                f"attack {self.name!r} ({self.domain}) needs a {wanted} column; {input_column!r} is "
                f"{dataset.features[input_column]}"
            )
        return input_column


def transform_rows(
    dataset: datasets.Dataset,
    column: str,
    rows: np.ndarray,
    transform: Callable[[list, list[int]], list],
    flag_column: str,
    label_column: str | None = None,
    new_label: int | None = None,
) -> datasets.Dataset:
    """Apply ``transform(items, row_indices)`` to ``column`` at ``rows`` and add a bool ``flag_column`` marking them.

    Image columns are read undecoded, so rows that are not transformed keep their stored bytes (no lossy
    re-encoding of JPEGs); transformed images are decoded with the column's own feature and stored as PNG.
    If ``new_label`` is given, transformed rows get it in ``label_column``.
    """
    import datasets

    chosen = {int(i) for i in rows}
    fmt = dataset.format
    feature = dataset.features[column]
    is_image = isinstance(feature, datasets.Image)
    work = dataset.with_format(None)
    if is_image:
        decoder = datasets.Image(mode=feature.mode)  # the column's own mode conversion, even if it is not decoded
        work = work.cast_column(column, datasets.Image(mode=feature.mode, decode=False))
    features = work.features.copy()
    features[flag_column] = datasets.Value("bool")
    unchanged = 0

    def fn(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        nonlocal unchanged
        flags = [i in chosen for i in indices]
        positions = [j for j, flag in enumerate(flags) if flag]
        if positions:
            values = list(batch[column])
            items = [values[j] for j in positions]
            if is_image:
                items = [decoder.decode_example(v) for v in items]
            new = transform(items, [indices[j] for j in positions])
            for j, old, item in zip(positions, items, new, strict=True):
                same = old == item if isinstance(item, str) else np.array_equal(np.asarray(old), np.asarray(item))
                unchanged += bool(same)
                values[j] = datasets.Image().encode_example(item) if is_image else item
            batch[column] = values
            if new_label is not None:
                batch[label_column] = [
                    new_label if flag else y for flag, y in zip(flags, batch[label_column], strict=True)
                ]
        batch[flag_column] = flags
        return batch

    out = work.map(
        fn,
        batched=True,
        with_indices=True,
        features=features,
        load_from_cache_file=False,
        desc=f"marking {flag_column}",
    )
    if unchanged:
        logger.warning("%d of %d rows marked %r are unchanged by the transform", unchanged, len(chosen), flag_column)
    if is_image:
        out = out.cast_column(column, feature)
    if fmt["type"] is not None:
        out = out.with_format(
            fmt["type"], columns=fmt["columns"], output_all_columns=fmt["output_all_columns"], **fmt["format_kwargs"]
        )
    return out


def attack_from_dict(params: dict[str, Any] | str) -> Attack:
    """Rebuild an attack from :meth:`Attack.to_dict` output (or its JSON string).

    Args:
        params: ``{"name": <registry name>, **fields}``, e.g. a zoo row's ``attack_params``.

    Returns:
        The attack; ``attack_from_dict(a.to_dict()) == a``.

    Example:
        ```python
        >>> from metashield_hf.attacks import attack_from_dict
        >>> attack_from_dict({"name": "blend", "alpha": 0.2, "seed": 3})
        Blend(seed=3, alpha=0.2, pattern='random')
        ```
    """
    if isinstance(params, str):
        params = json.loads(params)
    if not isinstance(params, dict) or "name" not in params:
        raise ValueError(f"attack params need a 'name' key (one of {ATTACKS.list()}), got {params!r}")
    kwargs = dict(params)
    cls = ATTACKS.get(kwargs.pop("name"))
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ValueError(f"unknown parameters {unknown} for attack {cls.name!r}; valid: {sorted(known)}")
    return cls(**kwargs)

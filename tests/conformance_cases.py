"""Loader for the tf-keras golden trajectories: Adam's in tests/conformance, the family's in
tests/conformance_optimizers (each folder's README.md gives the format)."""

import json
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

CONFORMANCE_DIR = Path(__file__).parent / "conformance"
FAMILY_DIR = Path(__file__).parent / "conformance_optimizers"

SparseArrays = tuple[np.ndarray, np.ndarray]
"""A sparse gradient as stored: (indices int64 (n,), values float32 (n, *shape[1:]))."""


class Case(NamedTuple):
    """One golden trajectory; step K of the README is index K - 1 of each list."""

    name: str
    class_name: str  # the tf-keras optimizer class, e.g. "Adam", "RMSprop"
    config: dict[str, Any]  # the raw constructor arguments
    variables: list[tuple[str, tuple[int, ...]]]  # (name, shape), in apply order
    steps: int
    has_ema: bool
    init: dict[str, np.ndarray]  # values before the first step
    grads: list[dict[str, np.ndarray | SparseArrays]]  # per step: dense array or (indices, values)
    expect: list[dict[str, np.ndarray]]  # per step: variables after the step
    ema: list[dict[str, np.ndarray]] | None  # per step: moving averages (None without EMA)
    lr: list[float]  # per step: the learning rate the step used
    iterations: list[int]  # per step: iterations after the step
    final: dict[str, np.ndarray]  # after finalize_variable_values
    slots: dict[str, dict[str, np.ndarray]]  # per variable: its slots under their tf-keras names
    slot_names: list[str]  # the class's slot names (Adam: "m", "v", and "vhat" with amsgrad)
    keras_config: dict[str, Any] | None  # family cases: tf_keras.optimizers.serialize(opt)
    state: dict[str, np.ndarray]  # optimizer-wide state after the last step (Nadam: "u_product")


def case_names(directory: Path = CONFORMANCE_DIR) -> list[str]:
    """The case names of a folder in index.json order."""
    return json.loads((directory / "index.json").read_text())["cases"]


def family_case_names() -> list[str]:
    """The family's case names (every tf-keras class, and Adam's adaptive_epsilon)."""
    return case_names(FAMILY_DIR)


def load_case(name: str, directory: Path | None = None) -> Case:
    """Read NAME.json and NAME.npz into a `Case` (from Adam's folder, else the family's, unless given)."""
    if directory is None:
        directory = CONFORMANCE_DIR if (CONFORMANCE_DIR / f"{name}.json").exists() else FAMILY_DIR
    meta = json.loads((directory / f"{name}.json").read_text())
    with np.load(directory / f"{name}.npz") as npz:
        arrays = {key: npz[key] for key in npz.files}
    names = [variable["name"] for variable in meta["variables"]]
    steps = range(1, meta["steps"] + 1)

    def per_step(prefix: str) -> list[dict[str, np.ndarray]]:
        return [{n: arrays[f"{prefix}/{k}/{n}"] for n in names} for k in steps]

    def grad(k: int, n: str) -> np.ndarray | SparseArrays:
        key = f"grad/{k}/{n}"
        return arrays[key] if key in arrays else (arrays[f"{key}/indices"], arrays[f"{key}/values"])

    slot_names = meta.get("slots") or ["m", "v", "vhat"]
    return Case(
        name=meta["name"],
        class_name=meta.get("class_name", "Adam"),
        config=meta["config"],
        variables=[(v["name"], tuple(v["shape"])) for v in meta["variables"]],
        steps=meta["steps"],
        has_ema=meta["has_ema"],
        init={n: arrays[f"init/{n}"] for n in names},
        grads=[{n: grad(k, n) for n in names} for k in steps],
        expect=per_step("expect"),
        ema=per_step("ema") if meta["has_ema"] else None,
        lr=[float(arrays[f"lr/{k}"]) for k in steps],
        iterations=[int(arrays[f"iterations/{k}"]) for k in steps],
        final={n: arrays[f"final/{n}"] for n in names},
        slots={n: {s: arrays[f"slots/{n}/{s}"] for s in slot_names if f"slots/{n}/{s}" in arrays} for n in names},
        slot_names=[s for s in slot_names if any(f"slots/{n}/{s}" in arrays for n in names)],
        keras_config=meta.get("keras_config"),
        state={key.removeprefix("state/"): arrays[key] for key in arrays if key.startswith("state/")},
    )


def close(got: np.ndarray, want: np.ndarray) -> bool:
    """|got - want| <= 1e-5 + 1e-5 * |want| everywhere (the README's tolerance), shapes equal."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return got.shape == want.shape and bool(np.all(np.abs(got - want) <= 1e-5 + 1e-5 * np.abs(want)))


def assert_close(got: np.ndarray, want: np.ndarray, what: str) -> None:
    """Assert `close`, reporting the worst element (by excess over the tolerance)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    if close(got, want):
        return
    excess = np.abs(got - want) - (1e-5 + 1e-5 * np.abs(want))
    worst = np.unravel_index(np.argmax(np.where(np.isnan(excess), np.inf, excess)), excess.shape)
    raise AssertionError(
        f"{what}: worst element {tuple(int(i) for i in worst)}: got {got[worst]!r}, want {want[worst]!r} "
        f"(|diff| {abs(got[worst] - want[worst]):.3g})"
    )

"""`optserve status ADDRESS`: a terminal table of a server's optimizers."""

from collections.abc import Sequence

import numpy as np

from optserve.client import OptimizerInfo

COLUMNS = ("NAME", "OPTIMIZER", "MODE", "VERSION", "ITERATIONS", "TENSORS", "BYTES", "DEVICE", "PUSHES/S", "LAST PUSH")


CLIENT_COLUMNS = ("OPTIMIZER", "CLIENT", "TRANSPORT", "RECEIVED", "SENT", "LAST SEEN")


def format_table(infos: Sequence[OptimizerInfo]) -> str:
    """Aligned columns, one optimizer a row, then one row per client connection and transport.

    `(no optimizers)` when there are none.
    """
    if not infos:
        return "(no optimizers)"
    table = _aligned([COLUMNS] + [_row(info) for info in infos])
    clients = [(info.name, c["peer"], c["transport"], _human_bytes(c["bytes_received"]), _human_bytes(c["bytes_sent"]),
                _age(c["last_seen_age"])) for info in infos for c in info.clients]
    return table + ("\n\n" + _aligned([CLIENT_COLUMNS] + clients) if clients else "")


def _aligned(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def _row(info: OptimizerInfo) -> tuple[str, ...]:
    mode = info.training_mode["mode"]
    if mode == "sync":
        mode = f"sync/{info.training_mode['num_workers']}"
    elif info.training_mode["max_staleness"] is not None:
        mode = f"async<={info.training_mode['max_staleness']}"
    params = sum(int(np.prod(shape, dtype=np.int64)) for shape, _ in info.tensors.values())
    return (info.name, info.optimizer, mode, str(info.version), str(info.iterations), str(len(info.tensors)),
            _human_bytes(4 * params), info.device, f"{info.pushes_per_second:.1f}", _age(info.last_push_age))


def _human_bytes(count: float) -> str:
    unit = "B"
    for larger in ("KB", "MB", "GB", "TB"):
        if count < 1000:
            break
        count, unit = count / 1000, larger
    return f"{count:.0f} B" if unit == "B" else f"{count:.1f} {unit}"


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 120:
        return f"{seconds:.1f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"

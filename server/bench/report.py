"""Reporting: a table per section, the targets as text, and one PNG with a panel per section."""

from typing import TYPE_CHECKING

import numpy as np

from optserve.server.bench.common import MB

if TYPE_CHECKING:
    from optserve.server.bench.run import Plan

# --- tables --------------------------------------------------------------------


def target_text(target: dict) -> str:
    """A target as "met" or "NOT MET" with its value and limit, so a miss reads as plainly as a pass."""
    unit = target["unit"]
    return (f"{'met' if target['met'] else 'NOT MET'}: {target['value']:.3g}{unit} "
            f"(target {target['op']} {target['limit']:g}{unit})")


def print_table(title: str, headers: list[str], rows: list[list[str]], target: bool = True) -> None:
    """Prints a titled table: the first column left-aligned, the rest right-aligned, the last left with `target`."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    print(f"\n== {title} ==")
    for line in [headers, *rows]:
        cells = []
        for i, cell in enumerate(line):
            left = i == 0 or (target and i == len(line) - 1)
            cells.append(str(cell).ljust(widths[i]) if left else str(cell).rjust(widths[i]))
        print("  ".join(cells).rstrip(), flush=True)


def print_bandwidth(bw: dict) -> None:
    """Prints every bandwidth kernel and the bound a step is held against."""
    rows = [[name, f"{r['best_gb_s']:.1f}", f"{r['median_gb_s']:.1f}"]
            for group in ("host", "device") for name, r in bw[group].items()]
    print_table(f"memory bandwidth, {bw['array_bytes'] / MB:.0f} MB arrays (GB/s)", ["kernel", "best", "median"],
                rows, target=False)
    print(f"bound: {bw['bound_rule']} (best kernel: {bw['best_kernel']})")


def print_step(step: dict) -> None:
    """Prints the step times of the server engine, optax and the bound, with their targets."""
    rows = []
    targets = iter(step["targets"])
    for r in step["rows"]:
        bound_t, optax_t = next(targets), next(targets)
        rows.append([f"{r['params'] / 1e6:g}M", r["layout"], str(r["tensors"]), f"{r['server_ms']:.2f}",
                     f"{r['optax_ms']:.2f}", f"{r['bound_ms']:.2f}", f"{r['server_gb_s']:.1f}",
                     f"{r['server_vs_bound']:.2f}x", f"{r['server_vs_optax']:.2f}x",
                     f"bound {target_text(bound_t)}; optax {target_text(optax_t)}"])
    print_table("Adam step (median ms): server engine vs optax.adam vs bandwidth bound",
                ["params", "layout", "tensors", "server", "optax", "bound", "server GB/s", "vs bound", "vs optax",
                 "target"], rows)


def print_transfer(transfer: dict) -> None:
    """Prints push and pull MB/s of optserve, bare gRPC and raw TCP per size, targets on the target size."""
    rows = []
    for r in transfer["rows"]:
        for way in ("push", "pull"):
            mark = ""
            if r["mb"] == transfer["target_mb"]:
                grpc_t, tcp_t = [t for t in transfer["targets"] if t["name"].startswith(way)]
                mark = f"vs gRPC {target_text(grpc_t)}; vs TCP {target_text(tcp_t)}"
            fresh = f"{r['optserve_fresh_pull_mb_s']:.0f}" if way == "pull" else ""
            rows.append([f"{r['mb']} MB", way, f"{r[f'optserve_{way}_mb_s']:.0f}", fresh, f"{r[f'grpc_{way}_mb_s']:.0f}",
                         f"{r[f'tcp_{way}_mb_s']:.0f}", f"{r[f'{way}_vs_grpc']:.2f}x", f"{r[f'{way}_vs_tcp']:.2f}x",
                         f"{r['server_step_ms']:.1f}" if way == "push" else "", mark])
    print_table("push / pull throughput (MB/s, medians): optserve vs bare 1 MB-chunk gRPC vs raw TCP",
                ["size", "way", "optserve", "fresh pull", "bare gRPC", "raw TCP", "vs gRPC", "vs TCP",
                 "step ms in push", "target"], rows)


def print_server_model(server_model: dict) -> None:
    """Prints push and pull MB/s of the bare gRPC service per server model and aio's ratio to threads."""
    rows = [[model, f"{r['push_mb_s']:.0f}", f"{r['pull_mb_s']:.0f}", f"{r['push_ms']:.1f}", f"{r['pull_ms']:.1f}"]
            for model, r in server_model["rows"].items()]
    ratio = server_model["aio_vs_threads"]
    rows.append(["aio / threads", f"{ratio['push']:.2f}x", f"{ratio['pull']:.2f}x", "", ""])
    print_table(f"server model: bare 1 MB-chunk gRPC, {server_model['mb']} MB, grpc thread pool vs grpc.aio "
                f"(medians)", ["model", "push MB/s", "pull MB/s", "push ms", "pull ms"], rows, target=False)


def print_round_trip(rt: dict) -> None:
    """Prints the round trip split into compute, (de)serialization and transfer, and the physical floor."""
    rows = []
    floor_t, bf16_t = rt["targets"]
    for wire, r in rt["rows"].items():
        rows.append([wire, f"{r['push_bytes'] / MB:.0f}", f"{r['push_ms']:.1f}", f"{r['pull_ms']:.1f}",
                     f"{r['round_trip_ms']:.1f}", f"{r['compute_ms']:.1f}",
                     f"{r['serialization_ms']['push']:.1f}+{r['serialization_ms']['pull']:.1f}",
                     f"{r['transfer_ms']['push']:.1f}+{r['transfer_ms']['pull']:.1f}", f"{r['vs_floor']:.2f}x",
                     f"floor {target_text(floor_t)}" if wire == "float32" else f"push transfer speedup "
                                                                                f"{target_text(bf16_t)}"])
    print_table(f"round trip, {rt['params'] / 1e6:g}M params (ms, medians): push + step + pull",
                ["wire", "push MB", "push", "pull", "round trip", "compute", "(de)ser push+pull",
                 "transfer push+pull", "vs floor", "target"], rows)
    f = rt["floor"]
    print(f"physical floor {rt['floor_ms']:.1f} ms = raw TCP push {f['tcp_push_ms']:.1f} + raw TCP pull "
          f"{f['tcp_pull_ms']:.1f} + step bound {f['step_bound_ms']:.1f}; bfloat16 round trip "
          f"{rt['bfloat16_round_trip_speedup']:.2f}x faster than float32")


def print_workers(workers: dict) -> None:
    """Prints the aggregate push rate per worker count, the target on the largest count."""
    rows = []
    for r in workers["rows"]:
        mark = target_text(workers["targets"][0]) if r is workers["rows"][-1] else ""
        rows.append([str(r["workers"]), str(r["pushes"]), f"{r['seconds']:.1f}", f"{r['steps_per_s']:.1f}",
                     f"{r['mb_per_s']:.0f}", f"{r['median_push_ms']:.1f}", mark])
    print_table(f"concurrent workers pushing {workers['push_bytes'] / MB:.0f} MB each (aggregate)",
                ["workers", "pushes", "seconds", "steps/s", "MB/s", "median push ms", "target"], rows)
    rows = [[str(r["workers"]), str(r["pushes"]), f"{r['seconds']:.1f}", f"{r['steps_per_s'] / r['workers']:.1f}",
             f"{r['mb_per_s']:.0f}", f"{r['median_push_ms']:.1f}"] for r in workers["sync_rows"]]
    print_table(f"sync rounds: every worker pushes {workers['push_bytes'] / MB:.0f} MB per round, "
                f"{workers['sync_rounds']} rounds (summed on the device)",
                ["workers", "pushes", "seconds", "rounds/s", "MB/s", "median push ms"], rows, target=False)


def print_versus(versus: dict) -> None:
    """Prints "optserve vs peers": each system's round trip in ms and as a ratio to each floor, and 4 workers' rate."""
    f = versus["floors"]
    rows = []
    for r in versus["rows"]:
        cells = [r["system"]]
        for layout in ("one", "mixed"):
            ms = r.get(f"{layout}_ms")
            cells += [f"{ms:.1f}", f"{r[f'{layout}_vs_tcp_floor']:.2f}x", f"{r[f'{layout}_vs_shm_floor']:.2f}x"] \
                if ms is not None else ["-", "-", "-"]
        rate = r.get("workers_round_trips_per_s")
        cells.append(f"{rate:.1f}" if rate is not None else "-")
        cells.append("+".join(r.get("server_transports", [])) or "-")
        errors = {**r.get("errors", {}), **({"workers": r["workers"]["error"]}
                                             if "error" in (r.get("workers") or {}) else {})}
        cells.append(r.get("error") or "; ".join(f"{k}: {v}" for k, v in errors.items()))
        rows.append(cells)
    n = versus["params"] / 1e6
    print_table(f"optserve vs peers: push {n:g}M float32 + one Adam step + pull {n:g}M weights (ms, medians of "
                f"{versus['reps']}; x the TCP floor {f['tcp_floor_ms']:.1f} ms and the shared-memory floor "
                f"{f['shm_floor_ms']:.1f} ms)",
                ["system", "1 tensor", "x TCP", "x shm", f"{versus['tensors']['mixed']} tensors", "x TCP", "x shm",
                 f"{versus['workers']} workers rt/s", "server saw", "error"], rows)
    print(f"TCP floor {f['tcp_floor_ms']:.1f} ms = raw TCP push {f['tcp_push_ms']:.1f} + pull {f['tcp_pull_ms']:.1f} "
          f"+ Adam bound {f['adam_bound_ms']:.1f}; shared-memory floor {f['shm_floor_ms']:.1f} ms = copy in "
          f"{f['copy_in_ms']:.1f} + copy out {f['copy_out_ms']:.1f} + Adam bound {f['adam_bound_ms']:.1f}")
    print(versus["note"])
    ratios = [[e["optserve"], e["peer"]] + [f"{e[k]:.2f}x" if e[k] is not None else "-"
                                            for k in ("one_time_ratio", "mixed_time_ratio", "workers_rate_ratio")]
              for e in versus["ratios"]]
    if any(any(cell != "-" for cell in row[2:]) for row in ratios):
        print_table("optserve / peer (time ratios: < 1 is faster; rate ratio: > 1 is more round trips/s)",
                    ["optserve", "peer", "1 tensor", "100 tensors", "workers rate"], ratios, target=False)
    print_table("optserve vs peers: targets", ["target", "result"],
                [[t["name"], target_text(t)] for t in versus["targets"]])


def print_memory(memory: dict) -> None:
    """Prints the server's peak RSS against its state and its RSS growth over pushes, with their targets."""
    p, g = memory["peak"], memory["growth"]
    peak_t, growth_t = memory["targets"]
    rows = [
        ["peak RSS", f"{p['params'] / 1e6:g}M params, state {p['state_bytes'] / MB:.0f} MB, idle "
                     f"{p['idle_rss'] / MB:.0f} MB, holding {p['rss_holding_state'] / MB:.0f} MB",
         f"{p['peak_rss'] / MB:.0f} MB", f"{p['peak_vs_state']:.2f}x state", target_text(peak_t)],
        ["RSS growth", f"{g['pushes']} pushes of {g['push_bytes'] / MB:.0f} MB, after push {g['warmup_pushes']}: "
                       f"{g['rss_after_warmup'] / MB:.0f} MB -> {g['rss_last'] / MB:.0f} MB",
         f"{g['growth_bytes'] / MB:+.1f} MB", f"{g['slope_bytes_per_push'] / 1e3:+.1f} KB/push",
         target_text(growth_t)],
    ]
    print_table("server memory (RSS)", ["what", "setup", "value", "ratio", "target"], rows)


def print_durability(durability: dict, plan: "Plan") -> None:
    """Prints each durability mode's median push and its cost relative to memory."""
    base = durability["memory"]["push_ms"]
    rows = [[mode, f"{r['push_ms']:.2f}", f"{r['mb_per_s']:.0f}", f"{r['push_ms'] / base:.2f}x", "-"]
            for mode, r in durability.items()]
    print_table(f"durability: {plan.durability_pushes} pushes of {plan.durability_params:,} float32 gradients "
                f"({plan.durability_params * 4 / MB:.0f} MB), median", ["mode", "push ms", "MB/s", "vs memory",
                                                                        "target"], rows)


def print_scale_out(scale_out: dict) -> None:
    """Prints the aggregate pushes per second per shard count, the target on the largest; or why it was skipped."""
    title = (f"scale-out: {scale_out['workers']} workers pushing {scale_out['push_bytes'] / MB:.0f} MB each "
             f"({scale_out['tensors']} tensors) to 1..{max(scale_out['shard_counts'])} shards, every process in its "
             f"own network namespace behind a {scale_out['rate_mbit']:g} Mbit/s link")
    if "skipped" in scale_out:
        print(f"\n== {title} ==\nskipped: {scale_out['skipped']}")
        return
    rows = []
    for r in scale_out["rows"]:
        mark = target_text(scale_out["targets"][0]) if scale_out["targets"] and r is scale_out["rows"][-1] else ""
        if "error" in r:
            rows.append([str(r["shards"]), "-", "-", "-", "-", "-", "-", f"error: {r['error']}"])
            continue
        rows.append([str(r["shards"]), str(r["pushes"]), f"{r['pushes_per_s']:.1f}", f"{r['speedup']:.2f}x",
                     f"{r['mb_per_s']:.0f}", f"{r['server_links_mb_s']:.0f}", f"{r['median_push_ms']:.0f}", mark])
    print_table(title, ["shards", "pushes", "pushes/s", "vs 1 shard", "MB/s", "server links MB/s",
                        "median push ms", "target"], rows)
    print(f"client: {scale_out['client']}")


# --- the plot ----------------------------------------------------------------


def write_plot(results: dict, path: str) -> None:
    """One PNG with a panel per section."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(18, 10))
    fig.suptitle(f"optserve bench on {results['environment']['device']} "
                 f"({'quick' if results['quick'] else 'full'} run, {results['elapsed_s']:.0f} s)")

    ax = axes[0, 0]
    rows = results["step"]["rows"]
    x = np.arange(len(rows))
    for i, (key, label) in enumerate([("server_ms", "server engine"), ("optax_ms", "optax.adam"),
                                      ("bound_ms", "bandwidth bound")]):
        ax.bar(x + (i - 1) * 0.27, [r[key] for r in rows], 0.27, label=label)
    ax.set_xticks(x, [f"{r['params'] / 1e6:g}M\n{r['layout']}" for r in rows])
    ax.set_yscale("log")
    ax.set_ylabel("ms per step (median)")
    ax.set_title("Adam step")
    ax.legend()

    ax = axes[0, 1]
    rows = results["transfer"]["rows"]
    x = np.arange(len(rows))
    series = [(f"{who}_{way}_mb_s", f"{label} {way}") for way in ("push", "pull")
              for who, label in (("optserve", "optserve"), ("grpc", "bare gRPC"), ("tcp", "raw TCP"))]
    for i, (key, label) in enumerate(series):
        ax.bar(x + (i - 2.5) * 0.14, [r[key] for r in rows], 0.14, label=label)
    ax.set_xticks(x, [f"{r['mb']} MB" for r in rows])
    ax.set_ylabel("MB/s (median)")
    ax.set_title("push / pull throughput")
    ax.legend(fontsize=7)

    ax = axes[0, 2]
    rt = results["round_trip"]
    wires = list(rt["rows"])
    bottom = np.zeros(len(wires))
    parts = [("compute", lambda r: r["compute_ms"]), ("(de)serialization", lambda r: r["serialization_ms"]["total"]),
             ("transfer", lambda r: r["transfer_ms"]["total"])]
    for label, get in parts:
        values = np.array([max(get(rt["rows"][w]), 0.0) for w in wires])
        ax.bar(wires, values, bottom=bottom, label=label)
        bottom += values
    ax.axhline(rt["floor_ms"], color="black", linestyle="--", label="physical floor (float32)")
    ax.set_ylim(0, max(bottom.max(), rt["floor_ms"]) * 1.4)
    ax.set_ylabel("ms (medians; transfer = the rest)")
    ax.set_title(f"round trip, {rt['params'] / 1e6:g}M params")
    ax.legend()

    ax = axes[1, 0]
    rows = results["workers"]["rows"]
    labels = [str(r["workers"]) for r in rows]
    bars = ax.bar(labels, [r["steps_per_s"] for r in rows])
    ax.bar_label(bars, [f"{r['mb_per_s']:.0f} MB/s" for r in rows])
    ax.set_xlabel("concurrent worker processes")
    ax.set_ylabel("aggregate steps/s")
    ax.set_title(f"concurrent pushes of {results['workers']['push_bytes'] / MB:.0f} MB")

    ax = axes[1, 1]
    g = results["memory"]["growth"]
    ax.plot([s["push"] for s in g["samples"]], [s["rss"] / MB for s in g["samples"]], ".-")
    ax.axvline(g["warmup_pushes"], color="gray", linestyle=":", label="end of warm-up")
    ax.set_xlabel("push")
    ax.set_ylabel("server RSS (MB)")
    p = results["memory"]["peak"]
    ax.set_title(f"RSS over pushes; peak {p['peak_rss'] / MB:.0f} MB holding {p['state_bytes'] / MB:.0f} MB state")
    ax.legend()

    ax = axes[1, 2]
    durability = results["durability"]
    ax.bar(list(durability), [r["push_ms"] for r in durability.values()])
    ax.set_ylabel("push ms (median)")
    ax.set_title(f"durability, {results['plan']['durability_params'] * 4 / MB:.0f} MB pushes")

    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)

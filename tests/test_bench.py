"""`optserve bench --quick` runs end to end and reports every section (a smoke test: timings are never asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("optax", reason="optserve bench needs the bench extra")
pytest.importorskip("psutil", reason="optserve bench needs the bench extra")

from optserve.server.bench import mixed_sizes  # noqa: E402 (after the skips)

SECTIONS = ("environment", "bandwidth", "step", "transfer", "server_model", "round_trip", "workers", "versus",
            "chunk_size", "memory", "durability", "scale_out")
TARGET_SECTIONS = {"step", "transfer", "round_trip", "workers", "versus", "memory"}


def test_quick_bench_reports_every_section_and_writes_the_plot(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "-m", "optserve.server.cli", "bench", "--quick", "--json", str(out)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)  # the plot lands in cwd
    assert run.returncode == 0, run.stdout + run.stderr
    results = json.loads(out.read_text())
    assert results["quick"] is True
    for section in SECTIONS:
        assert section in results, section
    assert results["environment"]["device"]
    assert results["bandwidth"]["best_gb_s"] > 0

    step = results["step"]["rows"]
    assert {(r["params"], r["layout"], r["tensors"]) for r in step} == {(1_000_000, "flat", 1),
                                                                       (1_000_000, "mixed", 100)}
    assert all(r["server_ms"] > 0 and r["optax_ms"] > 0 and r["bound_ms"] > 0 for r in step)

    transfer = results["transfer"]["rows"]
    assert [r["mb"] for r in transfer] == [4, 16]
    for row in transfer:
        for who in ("optserve", "grpc", "tcp"):
            for way in ("push", "pull"):
                assert row[f"{who}_{way}_mb_s"] > 0

    server_model = results["server_model"]["rows"]
    assert set(server_model) == {"threads", "aio"}
    for row in server_model.values():
        assert row["push_mb_s"] > 0 and row["pull_mb_s"] > 0

    round_trip = results["round_trip"]
    assert set(round_trip["rows"]) == {"float32", "bfloat16"}
    for row in round_trip["rows"].values():
        assert row["round_trip_ms"] > 0 and row["compute_ms"] > 0
        assert set(row["serialization_ms"]) == set(row["transfer_ms"]) == {"push", "pull", "total"}
    assert round_trip["rows"]["bfloat16"]["push_bytes"] * 2 == round_trip["rows"]["float32"]["push_bytes"]
    assert round_trip["floor_ms"] > 0

    assert [r["workers"] for r in results["workers"]["rows"]] == [1, 2, 4]
    assert all(r["pushes"] > 0 for r in results["workers"]["rows"])
    rounds = results["workers"]["sync_rounds"]
    assert [(r["workers"], r["pushes"]) for r in results["workers"]["sync_rows"]] == [(2, 2 * rounds), (4, 4 * rounds)]

    versus = results["versus"]
    assert versus["params"] == 1_000_000 and versus["tensors"] == {"one": 1, "mixed": 100}
    assert versus["peers_run"] is False  # a quick run leaves the peers out unless --peers asks for them
    floors = versus["floors"]
    assert floors["tcp_floor_ms"] > floors["adam_bound_ms"] > 0 and floors["shm_floor_ms"] > floors["adam_bound_ms"]
    rows = {r["system"]: r for r in versus["rows"]}
    assert set(rows) == {"optserve local zero-copy", "optserve local", "optserve network", "optserve grpc",
                         "torch rpc tensorpipe default", "torch rpc tcp", "ray actor"}
    grpc_row = rows["optserve grpc"]  # the portable path runs everywhere; the others may report an error
    assert grpc_row["one_ms"] > 0 and grpc_row["mixed_ms"] > 0 and grpc_row["workers_round_trips_per_s"] > 0
    assert grpc_row["server_transports"] == ["grpc"]
    for row in rows.values():
        if row["kind"] == "peer":
            assert row["skipped"] and row["error"]
        else:  # every optserve row either ran both layouts or says why not
            assert ("one_ms" in row and "mixed_ms" in row) or row.get("error") or row.get("errors"), row
    assert len(versus["ratios"]) == 4 * 3
    assert {t["name"].split(" 1M")[0] for t in versus["targets"]} >= {"same host round trip", "network round trip"}

    memory = results["memory"]
    assert memory["peak"]["peak_rss"] >= memory["peak"]["idle_rss"] > 0
    assert memory["growth"]["pushes"] == 200 and len(memory["growth"]["samples"]) >= 10

    assert set(results["durability"]) == {"memory", "wal", "none"}
    assert all(row["push_ms"] > 0 for row in results["durability"].values())

    scale_out = results["scale_out"]  # run where namespaces can be made, else skipped with the reason
    if "skipped" in scale_out:
        assert scale_out["skipped"] and not scale_out["rows"] and "skipped: " in run.stdout
    else:
        assert [r["shards"] for r in scale_out["rows"]] == [1, 2, 3]
        assert all(r["pushes"] > 0 and r["pushes_per_s"] > 0 for r in scale_out["rows"]), scale_out["rows"]
        assert scale_out["rows"][0]["speedup"] == 1.0
    ran = TARGET_SECTIONS | (set() if "skipped" in scale_out else {"scale_out"})

    # Every target is reported, met or not, in the JSON and in the printed tables.
    targets = results["targets"]
    assert {t["section"] for t in targets} == ran
    assert all(isinstance(t["met"], bool) for t in targets)
    for section in ran:
        assert results[section]["targets"], section
    chunk = results["chunk_size"]
    assert [r["chunk_kib"] for r in chunk["rows"]] == [256, 1024, 3584] and chunk["best_chunk_kib"] in (256, 1024, 3584)
    assert "targets met" in run.stdout
    for title in ("Adam step", "push / pull throughput", "server model", "round trip", "concurrent workers",
                  "sync rounds", "optserve vs peers", "chunk size", "server memory", "durability", "scale-out"):
        assert title in run.stdout, title
    assert (tmp_path / "optserve-bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mixed_sizes_are_100_tensors_over_three_decades_summing_to_the_total() -> None:
    for total in (1_000_000, 10_000_000, 50_000_000):
        sizes = mixed_sizes(total)
        assert len(sizes) == 100 and sum(sizes) == total and min(sizes) >= 1
        assert max(sizes) / min(sizes) > 100


def test_the_readme_probes_run_and_report_what_they_measured() -> None:
    """The two one-off measurements behind README limits run on small sizes (their figures are not asserted)."""
    from optserve.server.bench import probes

    ratio = probes.checked_step_ratio(size=1000, reps=2)
    assert ratio["in_place"] > 0 and ratio["checked"] > 0 and ratio["ratio"] == ratio["checked"] / ratio["in_place"]
    cost = probes.first_step_cost(3)
    assert cost["tensors"] == 3 and cost["seconds"] > 0 and cost["peak_rss_mb"] > 0
    run = subprocess.run([sys.executable, "-m", "optserve.server.bench.probes"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode != 0 and "checked-step" in run.stderr  # no command: the usage, and a failure status


def test_a_failing_worker_process_is_an_error_string_never_a_crash() -> None:
    """A system that cannot start or cannot run a round trip reports its error; the bench goes on."""
    from optserve.server.bench.drivers import BenchError, Driver

    with pytest.raises(BenchError, match="JSONDecodeError"):
        Driver("json:loads", "{not json")  # the factory raises in the child
    driver = Driver("builtins:dict")  # builds, but has no round_trip
    try:
        with pytest.raises(BenchError, match="AttributeError"):
            driver.round_trip("one")
        assert driver.call("__len__") == 0  # the worker still answers after an error
    finally:
        driver.close()
    assert not driver.process.is_alive()


def test_a_peer_whose_package_is_missing_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from optserve.server.bench import peer_servers

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    assert peer_servers.missing("ray").startswith("not installed: ray")


def test_the_scale_out_model_spreads_evenly_over_every_shard_count() -> None:
    from optserve.server.bench.scaleout import model
    from optserve.wire.placement import place

    shapes = model(2_000_003, 24)
    assert sum(shape[0] for shape in shapes.values()) == 2_000_003 and len(shapes) == 24
    for shards in (1, 2, 3):
        table = place(shapes, shards)
        assert all(piece.whole for piece in table.pieces)  # no tensor split: the bench measures links
        loads = table.loads()
        assert max(loads) <= 1.01 * sum(loads) / shards, loads

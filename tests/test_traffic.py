"""The per-client transport table behind `optserve status`: bounded, most recent first, forgotten on delete."""

from optserve.server.traffic import Traffic


def test_entries_add_up_per_peer_and_transport_most_recent_first() -> None:
    traffic = Traffic()
    traffic.count("m", "ipv4:127.0.0.1:1", "grpc", received=10)
    traffic.count("m", "ipv4:127.0.0.1:2", "shared_memory", sent=40)
    traffic.count("m", "ipv4:127.0.0.1:1", "grpc", received=5, sent=1)
    assert [(c.peer, c.transport, c.bytes_received, c.bytes_sent) for c in traffic.clients("m")] == [
        ("ipv4:127.0.0.1:1", "grpc", 15, 1), ("ipv4:127.0.0.1:2", "shared_memory", 0, 40)]
    assert traffic.clients("other") == []


def test_the_table_is_bounded_and_forgets_deleted_optimizers() -> None:
    traffic = Traffic(max_clients=3)
    for port in range(200):  # 200 connections, each moving a byte
        traffic.count("m", f"ipv4:127.0.0.1:{port}", "bulk", received=1)
    assert [c.peer for c in traffic.clients("m")] == [f"ipv4:127.0.0.1:{p}" for p in (199, 198, 197)]
    traffic.forget("m")
    assert traffic.clients("m") == []

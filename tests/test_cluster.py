from __future__ import annotations

import psutil


def test_local_cluster_listens_on_loopback_only(ray_cluster):
    """DESIGN.md: a local cluster binds to 127.0.0.1; no Ray process may listen on another address."""
    import ray

    assert ray_cluster["started_local"]
    assert ray_cluster["address"].startswith("127.0.0.1:")

    @ray.remote
    def where():
        return ray.util.get_node_ip_address()

    assert ray.get(where.remote()) == "127.0.0.1"
    ray_pids = set()
    for p in psutil.process_iter(["pid", "name", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "ray" in cmd and ("gcs_server" in cmd or "raylet" in cmd or "ray/_private" in cmd or "dashboard" in cmd):
            ray_pids.add(p.info["pid"])
    assert ray_pids, "found no Ray processes to check"
    exposed = []
    for c in psutil.net_connections(kind="inet"):
        if c.status == psutil.CONN_LISTEN and c.pid in ray_pids and c.laddr.ip not in ("127.0.0.1", "::1", "::ffff:127.0.0.1"):
            exposed.append((c.pid, c.laddr))
    assert not exposed, f"Ray listens on non-loopback addresses: {exposed}"

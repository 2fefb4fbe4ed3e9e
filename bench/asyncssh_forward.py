"""An asyncssh port forward (``ssh -L`` done in Python), for the throughput comparison.

``python -m bench.asyncssh_forward server --port P`` runs an SSH server that admits
anyone (loopback only) and permits forwarding; ``... client --port P --listen L
--target T`` forwards local port L to 127.0.0.1:T through it and prints ``ready``.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import asyncssh


class _OpenServer(asyncssh.SSHServer):  # type: ignore[misc]  # untyped when absent
    def begin_auth(self, username: str) -> bool:
        return False  # no authentication: this is a loopback benchmark

    def connection_requested(self, *args: Any) -> bool:
        return True


async def serve(port: int) -> None:
    key = asyncssh.generate_private_key("ssh-ed25519")
    await asyncssh.listen("127.0.0.1", port, server_host_keys=[key], server_factory=_OpenServer)
    print("ready", flush=True)
    await asyncio.Event().wait()


async def forward(port: int, listen: int, target: int) -> None:
    async with asyncssh.connect(
        "127.0.0.1", port, known_hosts=None, username="bench", client_keys=None
    ) as conn:
        listener = await conn.forward_local_port("127.0.0.1", listen, "127.0.0.1", target)
        print("ready", flush=True)
        await listener.wait_closed()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=["server", "client"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--listen", type=int)
    parser.add_argument("--target", type=int)
    args = parser.parse_args()
    if args.mode == "server":
        asyncio.run(serve(args.port))
    else:
        asyncio.run(forward(args.port, args.listen, args.target))


if __name__ == "__main__":
    main()

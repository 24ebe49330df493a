"""memory:// passes the transport conformance suite."""

from __future__ import annotations

from meshlink.testing.conformance import Features, TransportConformance
from meshlink.transport import MemoryTransport, Transport


class TestMemoryConformance(TransportConformance):
    features = Features(fake_clock=True, timeout=5.0)

    def make_transport(self) -> Transport:
        return MemoryTransport(f"memory://{self.namespace}", clock=self.clock)

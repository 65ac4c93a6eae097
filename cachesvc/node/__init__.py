"""What only a node runs: the store (index, tiers, reservations, leases), the memory
arena, the disk tier, the model and profile registries, the gRPC servicer, the data-plane
servers, configuration and the ``serve``/``stats``/``ls`` commands. Imports the wire
package, never the SDK at import time, connectors, benchmarks or torch."""

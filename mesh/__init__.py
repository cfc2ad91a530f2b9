"""The router node: membership, gossip, routing policies, HTTP API and CLI."""

"""The gRPC fleet: an asyncio aggregator server and long-lived edge nodes, mutual TLS."""

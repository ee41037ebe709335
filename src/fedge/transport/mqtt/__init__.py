"""The MQTT transport: the fleet's calls through an MQTT 5 broker (Eclipse Mosquitto).

Nodes that sit behind NAT and already reach a broker need no port of the server's. The
broker authenticates every client by its certificate from the project CA and its ACL
keeps each node to its own topics (`topics.acl`), so the server can take a node's
identity from the topic a message arrived on. See docs/architecture.md, "MQTT".
"""

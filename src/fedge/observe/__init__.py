"""Watching a fleet from outside: Prometheus metrics of the server (`observe.fleet`), of
each node (`observe.node`), and the HTTP endpoint both are scraped on
(`observe.exposition`). Imported only when metrics are asked for: prometheus-client is
the ``observe`` extra, and a node without ``--metrics-port`` never loads it."""

"""Watching a fleet from outside: Prometheus metrics of the server (`observe.fleet`), of
each node (`observe.node`), and the HTTP endpoint both are scraped on
(`observe.exposition`); the server's web dashboard (`observe.dashboard`). Imported only
when asked for: prometheus-client is the ``observe`` extra, starlette and uvicorn the
``dashboard`` extra, and a node without ``--metrics-port`` loads neither."""

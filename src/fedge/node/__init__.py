"""The device side of a real fleet, written once for every transport: `runtime` (join,
task loop, heartbeats, backoff, resumable transfers, re-sending what the server lost),
`cache` (the model by hash, results in memory or in files), behind `link.Link`, which a
transport implements."""

"""The server side of a real fleet, written once for every transport.

`sessions` (identities, client-id bindings, liveness), `board` (open tasks and their
outcomes), `uploads` (receive, check, validate), `models` (published global models),
`events` (what happened, for observers), `service` (the calls a transport makes),
`bridge` (the coordinator's view), `runs` (new, resume, checkpoint, record) and `server`
(a run served by a transport). A transport maps its wire onto `FleetService`; nothing
here imports a transport.
"""

"""`tunelab monitor`: a stream of documents -> sentiment and entities -> per-entity windows in a database -> rules
-> alerts (log, webhooks, Prometheus) and a dashboard. See `service.py` for how the parts run together."""

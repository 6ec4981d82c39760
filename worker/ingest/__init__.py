"""`movinet-worker ingest`: many network cameras per process into their frame streams, through drops.

settings (the process and the camera list) -> feed (one decode thread per camera: connect, sample,
resize, encode, publish, reconnect) -> service (the set of feeds, reload, signals) -> health (metrics,
/healthz, /readyz), with metrics holding the counters they share.
"""

"""Helpers for multi-worker fault tests, one module per part (tests/cluster.py re-exports them all):

- base: constants, small utilities (free ports, bounded waits, slots) and the per-test key space;
- servers: private redis-server processes and a three-node Redis Cluster;
- workers: real `movinet-worker run` processes and fleets of them;
- traffic: a real-time camera publisher and a prediction watcher;
- checks: reference predictions and the checks every run must pass.
"""

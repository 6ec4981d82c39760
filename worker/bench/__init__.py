"""`movinet-worker bench` and `bench-model`: the tutorial's loop, the model alone and the whole
worker measured in one run (`main`), each backend in a process of its own (`worker`, `live`,
`harness`), reported against targets (`report`); `model` is the model-only sweep, `sizing` the fleet table
from a bench's JSON.
"""

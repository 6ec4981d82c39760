"""The hot path, in the order a frame takes it.

A frame is **read** (`reading.Reader`: where a camera resumes, entries to slot work or dead
letters) and **decoded** (`codec`) onto its camera's slot clock (`timeline`: two staggered windows),
in the camera table the parts share (`cameras.Cameras`: what a worker holds per camera). It is
**stepped** (`stepping.Stepper`: one slot of every ready camera per model call), its **alerts**
evaluated (`alerting`), and **published** (`publishing.Publisher`: predictions, alerts and dead
letters in one fenced Lua call, the script in `ownership`) exactly once, with each alert's
**evidence** (`evidence`) and **checkpoints** of model state (`checkpoint`). The **worker**
(`worker.Worker`) makes these parts, wires them and runs their tasks; subscriptions arrive on the
control stream (`control.Control`).

Around it: leases renewed from their own thread (`leases`), how many cameras a worker takes
(`capacity`, `memory`), every task supervised (`supervisor`), probes (`health`), Prometheus
(`metrics`) and Redis clients (`clients`). Nothing here imports `worker.tools` or `worker.bench`.
"""

"""The commands around the worker, each a user's job: `classify` a clip, `publish` a video as a
camera, `tail` predictions and alerts, `explain` an alert from its evidence, `plot` and `render`
predictions, and the `demo` of the whole path; `video` decodes clips onto the model's frame clock.
"""

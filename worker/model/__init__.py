"""The model: backends behind one interface (`backends`: LiteRT, TF Hub), what the worker needs to
know of a model (`info`), which cameras may share a call (`batching`), the class names with the
softmax and top-k maths (`labels`), and exporting models in TF Hub's format (`export`).
"""

"""Export dynamic networks to deployable formats.

`dynify.export.onnx` turns an early-exit cascade into an ONNX graph whose exits are real `If`
nodes, so ONNX Runtime skips the later segments when a sample exits, and into a `.pt2`
ExportedProgram that keeps the same `torch.cond` control flow.
"""

"""The data the project fabricates: the embedded sample (real CMU H&E + simulated Xenium),
procedural synthetic tissue, the layout benchmark, and the writers they need (Xenium bundle,
pyramidal OME-TIFF).
"""

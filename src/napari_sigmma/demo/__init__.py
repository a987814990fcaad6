"""The demo model (trained once, cached) and `napari-sigmma demo` (napari on the embedded
sample with the plugin's widgets, or headless screenshots).
"""

"""`napari-sigmma bench`: each benchmark's plain half beside its Qt half (live / live_qt,
cancel / cancel_qt, scale / scale_qt), the GPU bench, and host measurements (RSS, display,
fresh-process children).
"""

"""The live view without Qt: a checkpoint made ready for viewing (run), the engine that
encodes visible tiles in batches, its memory and disk caches, and which tiles are visible.
"""

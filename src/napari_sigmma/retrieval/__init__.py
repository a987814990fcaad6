"""Cross-modal retrieval: the embedding index (exact numpy, faiss IVF for large sets) and
the query store that maps cells ↔ tiles.
"""

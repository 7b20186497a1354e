"""beaver_vector: the faiss hybrid vector index for beaver collections (the ``[vector]`` extra).

Not implemented yet: until it is, collections use the exact search built into ``beaver.py``.
This module deliberately defines nothing, so ``beaver`` never mistakes it for a working index.
"""

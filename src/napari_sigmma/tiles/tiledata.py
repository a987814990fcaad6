"""The PyG data object of one tile's cell graph.

Imports torch_geometric at module level: the rest of ``tiles/`` imports this module inside
functions, so gridding and graph building stay light.
"""

from __future__ import annotations

from typing import Any

from torch_geometric.data import Data


class TileData(Data):
    """``torch_geometric.data.Data`` of one tile whose ``tile_index`` is not offset on batching.

    PyG shifts every attribute with ``index`` in its name by the node count when batching;
    ``tile_index`` is an id, not a node pointer.
    """

    def __inc__(self, key: str, value: Any, *args: Any, **kwargs: Any) -> Any:
        if key == "tile_index":
            return 0
        return super().__inc__(key, value, *args, **kwargs)

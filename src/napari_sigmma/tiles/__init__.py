"""tiles layer of napari-sigmma (see the README architecture section)."""

"""The paper's evaluation: Task 1 (ridge probe: PCC / MSE) and Task 2 (Recall@p%),
baselines and Table 4's cumulative rows, seeds and bootstrap CIs, topology controls, reports.
`run` calls the others; nothing here imports napari or Qt.
"""

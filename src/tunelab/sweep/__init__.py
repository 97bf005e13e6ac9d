"""`tunelab sweep`: a hyperparameter search on Ray Tune where every trial is an ordinary run folder.

space (values and distributions, the trial list) -> plan (every trial's config and the goals, all checked before
anything runs) -> folder (sweep.json: new, refused, or resumed) -> runner (Ray Tune with ASHA; trial.py runs in
the workers) -> summary (ranking, best.yaml, the table) and html (sweep.html). run.py chains them.
"""

"""tuning: Ray Train, Ray Tune + Optuna and MLflow around the flexkd loop.

Ray, Optuna and MLflow are imported inside the functions that use them, so `flexkd show` and the config
checks start in well under a second.
"""

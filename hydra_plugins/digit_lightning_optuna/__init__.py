"""`hydra/sweeper=optuna`: digit_lightning's Hydra sweeper on a current Optuna (see optuna_sweeper.py)."""

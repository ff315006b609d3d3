"""The recipe's builders (build.py), its learning-rate schedule (lr_schedule.py) and Muon (muon.py); the recipes
themselves, the flags' values they set, are declared with the flags (config.RECIPES)."""

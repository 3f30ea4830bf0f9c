"""Built-in ossensor plugins, installed as ``ossensor_plugins`` and found through entry points."""

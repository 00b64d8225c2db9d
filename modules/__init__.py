"""Every method of the collection. Importing the package imports each file in it, so every
LightningModule defined here is selectable by its short class name from cli.py and the YAML configs."""

import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")

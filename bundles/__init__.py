"""CalciMap's MONAI bundles.

Each bundle keeps Model-Zoo layout with its code in `<bundle>/scripts/` (imported as `scripts` by
its own configs, with the bundle root on sys.path). Inside a bundle the modules import each
other relatively, so the same code also imports under a unique name from the repository root,
e.g. `bundles.s2cac_coronary_calcium.scripts.scoring`: that is how the app and the command-line
tools load two bundles in one process without their `scripts` packages colliding.
"""

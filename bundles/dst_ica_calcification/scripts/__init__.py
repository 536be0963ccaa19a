"""Code of the DST bundle: network, losses, data, training engine, evaluation. Modules import each other relatively.

The segment mapping scores with the S2CAC bundle's scorer and the evaluation uses its bootstrap, the project's
one implementation of each; loaded as ``scripts`` from the bundle root, the package makes the repository root
importable for that.
"""

import sys
from pathlib import Path

try:
    import bundles.s2cac_coronary_calcium.scripts  # noqa: F401
except ModuleNotFoundError:
    sys.path.append(str(Path(__file__).resolve().parents[3]))

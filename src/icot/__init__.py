"""implicit-cot: train language models to reason without writing their chain of thought.

The Python API (icot/api.py): `icot.train`, `icot.load`, `icot.generate_mult`; bad input raises
`icot.UserError`. `import icot` loads none of the heavy libraries: each function does when called.
"""

from icot.api import Model, generate_mult, load, train
from icot.errors import UserError

__version__ = "0.2.0"
__all__ = ["Model", "UserError", "generate_mult", "load", "train", "__version__"]

"""Entry point of ``python -m pilot.train`` (and of ``torchrun -m pilot.train``)."""
from .subnormals import flush_subnormals

# First, so that every thread the run creates inherits it (pilot.train.subnormals says why).
flush_subnormals()

from torch.distributed.elastic.multiprocessing.errors import record  # noqa: E402

from .cli import main  # noqa: E402
from .distributed import current  # noqa: E402

# Under torchrun, ``record`` hands an unexpected exception's traceback to torchrun, which prints it as the job's
# root cause; a single process prints its traceback as always.
raise SystemExit((record(main) if current().enabled else main)())

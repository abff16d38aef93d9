"""Entry point of ``python -m pilot.train`` (and of ``torchrun -m pilot.train``)."""
from torch.distributed.elastic.multiprocessing.errors import record

from .cli import main
from .distributed import current

# Under torchrun, ``record`` hands an unexpected exception's traceback to torchrun, which prints it as the job's
# root cause; a single process prints its traceback as always.
raise SystemExit((record(main) if current().enabled else main)())

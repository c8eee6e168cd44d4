"""Context parallelism for log-linear attention: each rank holds a contiguous slice of the sequence
(or of a packed batch) and ranks exchange only per-document Fenwick summaries, whose size depends on
the slice structure, never on T. ``CPContext`` is passed as ``cp=`` to the public ops."""

from ctxpar.cp.context import CPContext
from ctxpar.cp.exchange import SCHEMES
from ctxpar.cp.simulate import contexts, run, simulate
from ctxpar.cp.transport import SimGroup

__all__ = ["CPContext", "SCHEMES", "SimGroup", "contexts", "run", "simulate"]
